"""Benchmark mlx-aim against plain MLX and PyTorch, side by side (same as `mlx-aim bench`).

python scripts/benchmark.py --config NAME [--batch-size B] [--json OUT] [--markdown OUT]
    [--tasks train,embed] [--impls mlx-aim,plain-mlx,torch-eager,torch-compile]
    [--steps N] [--warmup N] [--rounds R] [--threads T] [--grad-checkpoint] [--growth]
    [--loader] [--mlx-blas auto,bundled]
"""

import sys

from cli.main import app

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]], prog_name="benchmark.py")
