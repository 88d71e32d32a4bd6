"""Benchmark mlx-aim against plain MLX and PyTorch, side by side (the same as `mlx-aim bench`).

python scripts/benchmark.py --config aim-tiny --batch-size 8 --rounds 3
python scripts/benchmark.py --help
"""

import sys
from pathlib import Path

# Run the checkout this script sits in, even when another copy of mlx-aim is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_aim_cli import bench  # noqa: E402
from mlx_aim_cli.scripting import command_app  # noqa: E402

if __name__ == "__main__":
    command_app(bench)(prog_name="benchmark.py")
