"""Forward + backward time of masked softmax and GELU on the CPU: the native kernels
(mlx_aim/cpu/native.py), the portable compiled kernels of mlx_aim.models.ops, and PyTorch eager.

Each cell: median wall time / median CPU time of this process (all its threads), which a busy
machine disturbs less. ``taskset -c 0`` with ``OMP_NUM_THREADS=1`` measures one core.

Usage: python scripts/bench_native_ops.py [--config aim-tiny] [--batch-size 8] [--repeats 20]
"""

# ruff: noqa: I001  (mlx_aim first: it picks the optimized BLAS before mlx.core loads)
import argparse
import statistics
import time

import mlx_aim  # noqa: F401
import mlx.core as mx
import numpy as np
import torch

from mlx_aim.bench import resolve_config
from mlx_aim.cpu.native import native_kernels, native_status
from mlx_aim.models import ops
from mlx_aim.models.layers import prefix_causal_mask


def median_ms(run, repeats: int) -> str:
    """``wall / CPU`` milliseconds of one call, medians over ``repeats`` after a warm-up."""
    run()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return f"{1e3 * statistics.median(wall):.2f} / {1e3 * statistics.median(cpu):.2f} ms"


def mlx_fwd_bwd(fn, x: mx.array, cotangent: mx.array):
    step = mx.compile(lambda x, g: mx.vjp(fn, [x], [g]))
    return lambda: mx.eval(step(x, cotangent))


def torch_fwd_bwd(fn, x: mx.array, cotangent: mx.array):
    x_t, g_t = torch.tensor(np.array(x)), torch.tensor(np.array(cotangent))

    def run():
        leaf = x_t.detach().requires_grad_()
        fn(leaf).backward(g_t)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="aim-tiny", help="a benchmark config (e.g. vit-s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    config, _, _ = resolve_config(args.config, ("train",))
    trunk = config.get("encoder", config)
    width, heads = trunk["embed_dim"], trunk["num_heads"]
    tokens = (trunk["image_size"] // trunk["patch_size"]) ** 2
    b = args.batch_size
    mx.set_default_device(mx.cpu)
    kernels = native_kernels()
    print(f"native CPU kernels: {native_status()}; torch threads: {torch.get_num_threads()}")

    mask = prefix_causal_mask(mx.random.randint(1, tokens, (b,)), tokens)
    mask_t = torch.tensor(np.array(mask))
    scores = mx.random.normal((b, heads, tokens, tokens)) * 3
    hidden = mx.random.normal((b, tokens, 4 * width))  # the MLP's hidden layer
    lowest = torch.finfo(torch.float32).min
    cases = {
        f"masked softmax {tuple(scores.shape)}": (
            scores,
            lambda s: kernels.softmax(s, mask),
            lambda s: ops._softmax_cpu(ops._masked(s, mask)),
            lambda s: torch.softmax(s.masked_fill(~mask_t, lowest), -1),
        ),
        f"GELU {tuple(hidden.shape)}": (
            hidden,
            kernels.gelu,
            ops._gelu_cpu,
            torch.nn.functional.gelu,
        ),
    }
    print("| op, forward + backward (wall / CPU) | native | portable (compiled) | torch eager |")
    print("|---|---|---|---|")
    for name, (x, native_fn, portable_fn, torch_fn) in cases.items():
        g = mx.random.normal(x.shape)
        mx.eval(x, g)
        times = [
            median_ms(mlx_fwd_bwd(native_fn, x, g), args.repeats),
            median_ms(mlx_fwd_bwd(portable_fn, x, g), args.repeats),
            median_ms(torch_fwd_bwd(torch_fn, x, g), args.repeats),
        ]
        print(f"| {name} | " + " | ".join(times) + " |")


if __name__ == "__main__":
    main()
