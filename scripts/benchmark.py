"""Benchmark mlx-aim against plain MLX and PyTorch, side by side (same as `mlx-aim bench`).

python scripts/benchmark.py --config NAME [--batch-size B] [--json OUT] [--markdown OUT]
    [--tasks train,embed] [--impls mlx-aim,plain-mlx,torch-eager,torch-compile]
    [--steps N] [--warmup N] [--rounds R] [--threads T] [--grad-checkpoint] [--growth]
    [--loader] [--mlx-blas auto,bundled]
"""

import sys
from pathlib import Path

# Run the checkout this script sits in, even when another copy of mlx-aim is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_aim_cli.main import app  # noqa: E402

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]], prog_name="benchmark.py")
