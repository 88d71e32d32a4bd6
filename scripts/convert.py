"""Convert a released AIM / AIMv2 checkpoint to mlx-aim's format (the same as `mlx-aim convert`).

python scripts/convert.py aimv2-large-patch14-224 models/aimv2-l
python scripts/convert.py --help
"""

import sys
from pathlib import Path

# Run the checkout this script sits in, even when another copy of mlx-aim is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_aim_cli import convert  # noqa: E402
from mlx_aim_cli.scripting import command_app  # noqa: E402

if __name__ == "__main__":
    command_app(convert)(prog_name="convert.py")
