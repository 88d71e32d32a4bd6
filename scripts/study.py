"""The AIMv1 paper's ablations at laptop scale (mlx_aim.experiments.study): train, probe, tabulate.

Trains the default recipe and one change at a time (the cells), for --steps steps and --seeds
seeds per cell, probing every checkpoint (every --eval-every steps) with a linear probe. Writes
study.md (the table and the correlations), study.png and study.json (every checkpoint's numbers)
into --output, one run per cell and seed under it; running it again keeps the finished runs and
resumes an interrupted one. The defaults take about 20 minutes on a 2-core CPU.

    python scripts/study.py
    python scripts/study.py --data ~/Pictures --probe-data ~/labelled --steps 2000 --seeds 3 \\
        --cells default,pixels,causal --output runs/study-photos
"""

import sys
from pathlib import Path

# Run the checkout this script sits in, even when another copy of mlx-aim is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_aim_cli.scripting import ArgumentParser, positive_int, run_script  # noqa: E402

from mlx_aim.errors import ExitCode  # noqa: E402
from mlx_aim.experiments.study import CELLS, StudyConfig, run_study  # noqa: E402

CODES = (
    ExitCode.OK,
    ExitCode.BAD_INPUT,
    ExitCode.USAGE,
    ExitCode.OUTPUT,
    ExitCode.NON_FINITE,
    ExitCode.INTERRUPTED,
)


def parse_args(argv: list[str]) -> StudyConfig:
    """The study's settings from the command line."""
    defaults = StudyConfig()
    parser = ArgumentParser(__doc__, CODES, prog="study.py")
    parser.add_argument(
        "--data", help="training images: a folder, glob or list (default: the built-in digits)"
    )
    parser.add_argument(
        "--probe-data",
        default=defaults.probe_data,
        help="labelled class folders for the probe, or a built-in dataset name",
    )
    parser.add_argument("--model", default=defaults.model, help="the trunk architecture")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help="steps per run")
    parser.add_argument(
        "--seeds", type=positive_int, default=defaults.seeds, help="seeds 0..N-1 per cell"
    )
    parser.add_argument(
        "--cells",
        default=",".join(CELLS),
        help=f"comma-separated cells, from: {', '.join(CELLS)}",
    )
    parser.add_argument(
        "--eval-every",
        type=positive_int,
        default=defaults.eval_every,
        help="validation, probe and checkpoint interval (steps)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=defaults.batch_size, help="images per step"
    )
    parser.add_argument("--output", default=defaults.output, help="the study's folder")
    args = parser.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    return StudyConfig(**{**vars(args), "cells": cells})


def main() -> None:
    """Run the study and print its table."""
    config = parse_args(sys.argv[1:])
    run_study(config)
    print(Path(config.output, "study.md").read_text(), end="")


if __name__ == "__main__":
    run_script(main)
