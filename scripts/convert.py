"""Convert a released AIM / AIMv2 checkpoint to mlx-aim's format (same as `mlx-aim convert`).

python scripts/convert.py SOURCE DESTINATION [--head FILE|last|best] [--arch NAME]
    [--probe-layers last|best|i,j,k] [--revision REV] [--dtype DTYPE] [--force]
"""

from cli.main import app

if __name__ == "__main__":
    app(["convert", *__import__("sys").argv[1:]], prog_name="convert.py")
