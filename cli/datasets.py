"""``mlx-aim datasets``: where the built-in datasets are (written on first use)."""

from __future__ import annotations

import typer

from mlx_aim.errors import ExitCode, exit_codes_help

from .errors import fail, reported_errors

CONTENTS = {
    "digits": "UCI handwritten digits, 32 px: train/ and val/ (1,500 / 297), 10 class folders",
    "scenes": "generated captioned shapes, 32 px: captioned/{train,val} (5,000 / 500 images "
    "with .txt captions); count/, colour/, shape/ class folders for probing",
}


def register(app: typer.Typer) -> None:
    """Add ``mlx-aim datasets`` to ``app``."""
    codes = (ExitCode.OK, ExitCode.USAGE, ExitCode.OUTPUT, ExitCode.INTERRUPTED)
    app.command("datasets", epilog=exit_codes_help(*codes))(datasets_command)


def datasets_command(
    name: str | None = typer.Argument(
        None, help="Print only this dataset's folder: digits or scenes.", show_default=False
    ),
) -> None:
    """Print the folders of the built-in datasets, writing them first if needed.

    Every command also takes them by name, from any folder: --data digits, --data scenes/count,
    mlx-aim embed digits/val/7, mlx-aim caption scenes/captioned/val/05000.png.
    They live in $MLX_AIM_CACHE/datasets (default ~/.cache/mlx-aim/datasets).

    Examples:

      mlx-aim datasets

      ls "$(mlx-aim datasets scenes)/count/val"
    """
    from mlx_aim.data.builtin import DATASETS, builtin_dataset

    if name is not None and name not in DATASETS:
        raise fail(f"{name!r} is not a built-in dataset ({', '.join(DATASETS)})", ExitCode.USAGE)
    with reported_errors():
        if name is not None:
            typer.echo(builtin_dataset(name))
            return
        for each in DATASETS:
            typer.echo(f"{each}\t{builtin_dataset(each)}\t{CONTENTS[each]}")
