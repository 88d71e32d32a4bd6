"""The AIMv1 paper's ablations at laptop scale (``mlx_aim.experiments.study``): train, probe, tabulate.

python scripts/study.py [--data DIR] [--probe-data DIR] [--model NAME] [--steps N] [--seeds N]
    [--cells default,pixels,causal,spiral,checkerboard,random-order,shallow-head]
    [--eval-every N] [--batch-size B] [--output DIR]

Writes DIR/study.md, DIR/study.png and DIR/study.json (default DIR: runs/study), one run per cell
and seed under DIR; running it again keeps the finished runs and resumes an interrupted one.
"""

import argparse
import sys
from pathlib import Path

# Run the checkout this script sits in, even when another copy of mlx-aim is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_aim_cli.errors import reported_errors  # noqa: E402

from mlx_aim.experiments.study import CELLS, StudyConfig, run_study  # noqa: E402


def parse_args(argv: list[str]) -> StudyConfig:
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="training images (default: the built-in digits)")
    parser.add_argument("--probe-data", default=defaults.probe_data, help="labelled images")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seeds", type=int, default=defaults.seeds, help="seeds 0..N-1")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--output", default=defaults.output)
    args = parser.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    return StudyConfig(**{**vars(args), "cells": cells})


if __name__ == "__main__":
    with reported_errors():
        config = parse_args(sys.argv[1:])
        run_study(config)
        print(Path(config.output, "study.md").read_text(), end="")
