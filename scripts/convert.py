"""Convert a released AIM / AIMv2 checkpoint to mlx-aim's format (same as `mlx-aim convert`).

python scripts/convert.py SOURCE DESTINATION [--head FILE|last|best] [--arch NAME]
    [--probe-layers last|best|i,j,k] [--revision REV] [--dtype DTYPE] [--force]
"""

import sys
from pathlib import Path

# Run the checkout this script sits in, even when another copy of mlx-aim is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_aim_cli.main import app  # noqa: E402

if __name__ == "__main__":
    app(["convert", *sys.argv[1:]], prog_name="convert.py")
