"""Forward + backward time of attention, masked softmax, GELU, LayerNorm and RMSNorm on the CPU,
and of one AdamW update of the model: the native kernels (mlx_aim/cpu/native.py), the portable ones
(mlx_aim.cpu.kernels; mx.fast; MLX's AdamW), PyTorch eager.

Each cell: median wall time / median CPU time of this process (all its threads), which a busy
machine disturbs less. ``taskset -c 0`` with ``OMP_NUM_THREADS=1`` measures one core.
``--train-step`` times mlx-aim's compiled training step instead, with the native kernels on and
off, the two steps interleaved in this process.

Usage: python scripts/bench_native_ops.py [--config aim-tiny] [--batch-size 8] [--repeats 20]
    [--train-step]
"""

# ruff: noqa: I001  (mlx_aim first: it picks the optimized BLAS before mlx.core loads)
import argparse
import os
import statistics
import time
from functools import partial

import mlx_aim  # noqa: F401
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_map

from mlx_aim.benchmark.workload import resolve_config
from mlx_aim.cpu import portable
from mlx_aim.cpu.native import native_kernels, native_status
from mlx_aim.models import build_model
from mlx_aim.models.layers import prefix_causal_mask
from mlx_aim.train.optim import AdamW, build_optimizer, warmup_cosine
from mlx_aim.train.step import accumulate_or_update, make_train_step


def timed(run) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - start_cpu


def medians_ms(times: list[tuple[float, float]]) -> str:
    wall, cpu = zip(*times, strict=True)
    return f"{1e3 * statistics.median(wall):.2f} / {1e3 * statistics.median(cpu):.2f} ms"


def median_ms(run, repeats: int) -> str:
    """``wall / CPU`` milliseconds of one call, medians over ``repeats`` after a warm-up."""
    run()
    return medians_ms([timed(run) for _ in range(repeats)])


def mlx_fwd_bwd(fn, x: mx.array, cotangent: mx.array):
    step = mx.compile(lambda x, g: mx.vjp(fn, [x], [g]))
    return lambda: mx.eval(step(x, cotangent))


def torch_fwd_bwd(fn, x: mx.array, cotangent: mx.array):
    x_t, g_t = torch.tensor(np.array(x)), torch.tensor(np.array(cotangent))

    def run():
        leaf = x_t.detach().requires_grad_()
        fn(leaf).backward(g_t)

    return run


def train_step_table(config: dict, batch: int, repeats: int) -> None:
    """The compiled training step with the native kernels on and off, interleaved."""
    trunk = config.get("encoder", config)
    images = mx.random.normal((batch, trunk["image_size"], trunk["image_size"], 3))
    steps, peaks = {}, {}
    for label, setting in (("native", "1"), ("portable", "0")):
        mx.random.seed(1)
        model = build_model(config)
        optimizer = build_optimizer(model, warmup_cosine(1e-4, 10, 1000, 0.0), weight_decay=0.05)
        steps[label] = make_train_step(model, optimizer, global_batch=batch, grad_clip=1.0)
        os.environ["MLX_AIM_NATIVE"] = setting  # read while the first call traces the step
        mx.reset_peak_memory()
        steps[label]([images])[0].item()
        peaks[label] = mx.get_peak_memory() / 2**20
    del os.environ["MLX_AIM_NATIVE"]
    times = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            times[label].append(timed(lambda step=step: step([images])[0].item()))
    print("| training step | wall / CPU | MLX peak |")
    print("|---|---|---:|")
    for label in steps:
        print(f"| {label} | {medians_ms(times[label])} | {peaks[label]:.0f} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="aim-tiny", help="a benchmark config (e.g. vit-s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--train-step", action="store_true", help="time the training step")
    args = parser.parse_args()
    config, _, _ = resolve_config(args.config, ("train",))
    mx.set_default_device(mx.cpu)
    kernels = native_kernels()
    print(f"native CPU kernels: {native_status()}; torch threads: {torch.get_num_threads()}")
    print(f"load average: {os.getloadavg()}")
    if args.train_step:
        train_step_table(config, args.batch_size, args.repeats)
    else:
        op_table(kernels, config, args.batch_size, args.repeats)


def op_table(kernels, config: dict, b: int, repeats: int) -> None:
    """Attention, masked softmax, GELU and the norms at the config's shapes: native, portable,
    torch; then one AdamW update of the model."""
    trunk = config.get("encoder", config)
    width, heads = trunk["embed_dim"], trunk["num_heads"]
    tokens = (trunk["image_size"] // trunk["patch_size"]) ** 2

    mask = prefix_causal_mask(mx.random.randint(1, tokens, (b,)), tokens)
    mask_t = torch.tensor(np.array(mask))
    scores = mx.random.normal((b, heads, tokens, tokens)) * 3
    hidden = mx.random.normal((b, tokens, 4 * width))  # the MLP's hidden layer
    residual = mx.random.normal((b, tokens, width)) * 2 + 0.5  # a LayerNorm's input
    weight, bias = mx.random.normal((width,)), mx.random.normal((width,))
    weight_t, bias_t = torch.tensor(np.array(weight)), torch.tensor(np.array(bias))
    lowest = torch.finfo(torch.float32).min
    qkv = mx.random.normal((3, b, heads, tokens, width // heads))
    scale = (width // heads) ** -0.5
    cases = {
        f"attention, q k v {tuple(qkv.shape[1:])} each, prefix-causal": (
            qkv,
            lambda x: kernels.attention(x[0], x[1], x[2], scale, mask),
            lambda x: portable.attention(x[0], x[1], x[2], scale, mask),
            lambda x: torch.nn.functional.scaled_dot_product_attention(
                x[0], x[1], x[2], attn_mask=mask_t
            ),
        ),
        f"masked softmax {tuple(scores.shape)}": (
            scores,
            lambda s: kernels.softmax(s, mask),
            lambda s: portable._softmax(portable._masked(s, mask)),
            lambda s: torch.softmax(s.masked_fill(~mask_t, lowest), -1),
        ),
        f"GELU {tuple(hidden.shape)}": (
            hidden,
            kernels.gelu,
            portable.gelu,
            torch.nn.functional.gelu,
        ),
        f"LayerNorm {tuple(residual.shape)}, gradient of the input": (
            residual,
            lambda x: kernels.layer_norm(x, weight, bias, 1e-6),
            lambda x: mx.fast.layer_norm(x, weight, bias, 1e-6),
            lambda x: torch.nn.functional.layer_norm(x, (width,), weight_t, bias_t, 1e-6),
        ),
        f"RMSNorm {tuple(residual.shape)}, gradient of the input": (
            residual,
            lambda x: kernels.rms_norm(x, weight, 1e-5),
            lambda x: mx.fast.rms_norm(x, weight, 1e-5),
            lambda x: torch.nn.functional.rms_norm(x, (width,), weight_t, 1e-5),
        ),
    }
    print("| op, forward + backward (wall / CPU) | native | portable (compiled) | torch eager |")
    print("|---|---|---|---|")
    for name, (x, native_fn, portable_fn, torch_fn) in cases.items():
        g = mx.random.normal(native_fn(x).shape)
        mx.eval(x, g)
        times = [
            median_ms(mlx_fwd_bwd(native_fn, x, g), repeats),
            median_ms(mlx_fwd_bwd(portable_fn, x, g), repeats),
            median_ms(torch_fwd_bwd(torch_fn, x, g), repeats),
        ]
        print(f"| {name} | " + " | ".join(times) + " |")
    optimizer_row(config, repeats)


def optimizer_row(config: dict, repeats: int) -> None:
    """One AdamW update of the whole pre-training model, with the gradient norm and clipping."""
    model = build_model(config)
    params = dict(tree_flatten(model.trainable_parameters()))
    grads = tree_map(lambda p: mx.random.normal(p.shape) * 1e-3, model.trainable_parameters())
    mx.eval(params, grads)
    runs = []
    for adamw in (AdamW, optim.AdamW):  # mlx-aim's training code (native on the CPU), MLX's own
        optimizer = adamw(learning_rate=1e-4, weight_decay=0.05)
        optimizer.init(model.trainable_parameters())
        state = [model.state, optimizer.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def update(optimizer=optimizer):
            if isinstance(optimizer, AdamW):
                accumulate_or_update(model, optimizer, grads, None, True, 1, 1, grad_clip=1.0)
            else:
                optimizer.update(model, optim.clip_grad_norm(grads, 1.0)[0])

        runs.append(lambda update=update, state=state: (update(), mx.eval(state)))
    tensors = [torch.tensor(np.array(p)).requires_grad_() for p in params.values()]
    for tensor, grad in zip(tensors, tree_flatten(grads), strict=True):
        tensor.grad = torch.tensor(np.array(grad[1]))
    torch_optimizer = torch.optim.AdamW(tensors, lr=1e-4, weight_decay=0.05)

    def torch_update():
        torch.nn.utils.clip_grad_norm_(tensors, 1.0)
        torch_optimizer.step()

    count = sum(p.size for p in params.values()) / 1e6
    times = [median_ms(run, repeats) for run in (*runs, torch_update)]
    print(f"| AdamW update, {count:.1f} M parameters | " + " | ".join(times) + " |")


if __name__ == "__main__":
    main()
