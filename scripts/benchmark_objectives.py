"""Training-step speed and memory of the AIMv2 objective against the AIMv1 one, on the same trunk.

    python scripts/benchmark_objectives.py                     # aimv2-nano, batch 32
    python scripts/benchmark_objectives.py --model aimv2-tiny --batch-size 8 --steps 5

Both steps are the ones ``mlx-aim train`` compiles: ``make_train_step`` over the ``aim_pretrain``
model (the trunk and its pixel MLP head, ``--objective aimv1``) and ``make_multimodal_train_step``
over the ``aimv2_pretrain`` model (the same trunk and the causal multimodal decoder,
``--objective aimv2``), float32, in one process, on random normalized images and random caption
tokens of the decoder's full text length (the step's cost does not depend on the token values).
Each step is warmed up, then timed ``--steps`` times; the table gives the median step's
images/s and MLX's peak memory over warm-up and timed steps (``mx.get_peak_memory``, reset
between the two objectives). The machine and its load average are printed with the figures:
on a shared machine, read them together.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_aim  # noqa: E402, F401  (first: it picks the fast BLAS before mlx.core loads)

# isort: split
import mlx.core as mx  # noqa: E402
from mlx_aim_cli.scripting import ArgumentParser, positive_int, run_script  # noqa: E402

from mlx_aim.checkpoints.registry import (  # noqa: E402
    REGISTRY,
    multimodal_pretrain_config,
    pretrain_config,
)
from mlx_aim.cpu.blas import blas_info  # noqa: E402
from mlx_aim.errors import ExitCode  # noqa: E402
from mlx_aim.models import build_model  # noqa: E402
from mlx_aim.train.multimodal_step import make_multimodal_train_step  # noqa: E402
from mlx_aim.train.optim import build_optimizer, warmup_cosine  # noqa: E402
from mlx_aim.train.step import make_train_step  # noqa: E402

PAD = 0
# The AIMv2 architectures without released weights: the ones `mlx-aim train` pre-trains.
MODELS = tuple(
    name
    for name, entry in REGISTRY.items()
    if entry.checkpoint is None and entry.config["model_type"] == "aim_v2"
)


CODES = (ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.USAGE, ExitCode.INTERRUPTED)


def objective_step(objective: str, name: str, batch: int, vocab_size: int):
    """The compiled step of ``objective`` on a fresh model and its (constant) micro-batch."""
    mx.random.seed(0)
    if objective == "aimv1":
        model = build_model(pretrain_config(name))
    else:
        model = build_model(multimodal_pretrain_config(name, vocab_size=vocab_size))
    optimizer = build_optimizer(model, warmup_cosine(1e-3, 1, 1000, 1e-5), weight_decay=0.05)
    size = model.encoder.args.image_size
    images = mx.random.normal((batch, size, size, 3))
    if objective == "aimv1":
        step = make_train_step(model, optimizer, global_batch=batch)
        return lambda: step([images])
    length = model.args.max_text_tokens + 1
    sequences = mx.random.randint(1, vocab_size, (batch, length)).astype(mx.int32)
    step = make_multimodal_train_step(model, optimizer, pad=PAD)
    return lambda: step([(images, sequences)])


def measure(objective: str, args: argparse.Namespace) -> dict[str, float]:
    """Median images/s over the timed steps and MLX's peak memory (GB)."""
    mx.clear_cache()
    mx.reset_peak_memory()
    step = objective_step(objective, args.model, args.batch_size, args.vocab_size)
    for _ in range(args.warmup):
        step()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()  # evaluates the loss, the gradient norm and the new state
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"images_per_s": args.batch_size / median, "peak_gb": mx.get_peak_memory() / 1e9}


def main() -> None:
    """Time both steps and print the table."""
    parser = ArgumentParser(__doc__, CODES, prog="benchmark_objectives.py")
    parser.add_argument(
        "--model", default="aimv2-nano", choices=MODELS, help="an AIMv2 laptop architecture"
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per step")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per objective")
    parser.add_argument("--warmup", type=positive_int, default=3, help="untimed steps first")
    parser.add_argument(
        "--vocab-size",
        type=positive_int,
        default=349,
        help="caption vocabulary (the scenes tokenizer's)",
    )
    args = parser.parse_args()
    blas = blas_info()
    print(
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, "
        f"{mx.default_device()}, BLAS {blas.name if blas else 'default'}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    results = {objective: measure(objective, args) for objective in ("aimv1", "aimv2")}
    print(f"\n| step ({args.model}, batch {args.batch_size}, float32) | images/s | peak memory |")
    print("|---|---|---|")
    names = {"aimv1": "AIMv1 (pixel head)", "aimv2": "AIMv2 (multimodal decoder)"}
    for objective, r in results.items():
        print(f"| {names[objective]} | {r['images_per_s']:.1f} | {r['peak_gb']:.3f} GB |")
    ratio = results["aimv2"]["images_per_s"] / results["aimv1"]["images_per_s"]
    print(f"\nAIMv2 / AIMv1 speed: {ratio:.2f}; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    run_script(main)
