"""``mlx-aim train``: AIM pre-training; its flags are generated from ``TrainConfig``'s fields."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from mlx_aim.errors import ExitCode, exit_codes_help
from mlx_aim.train.config import TrainConfig, read_config_file

from .errors import prepare_cpu_backend, reported_errors
from .options import config_options

_SHORT = {
    "data": "-d",
    "model": "-m",
    "output": "-o",
    "steps": "-n",
    "batch_size": "-b",
    "quiet": "-q",
}


def _parameters() -> list[inspect.Parameter]:
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
    params += config_options(TrainConfig, _SHORT)
    params.append(
        inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None,
                "--config",
                "-c",
                help="TOML or YAML file whose keys are these flags (e.g. batch-size = 64); "
                "flags given on the command line win.",
                rich_help_panel="Output",
                dir_okay=False,
            ),
            annotation=Optional[Path],  # noqa: UP045
        )
    )
    return params


def train_command(ctx: typer.Context, config_file: Path | None = None, **flags: Any) -> None:
    """Pre-train an AIM trunk on your images (AIMv1 next-patch, or AIMv2 with captions).

    With no arguments: pre-trains [bold]aim-nano[/bold] on the built-in digits in a few minutes.
    The output directory (default runs/<model>) gets checkpoints/, metrics.jsonl, previews/,
    loss.png, run.json and the trained trunk, ready for [bold]mlx-aim probe --model DIR[/bold],
    [bold]mlx-aim embed --model DIR[/bold] and mlx_aim.load(DIR). Running a command again on an
    output directory that holds a checkpoint continues that run.

    [bold]Examples[/bold]

      mlx-aim train

      mlx-aim train --objective aimv2   [dim](aimv2-nano, 300 steps on the built-in scenes)[/dim]

      mlx-aim train --data ~/Pictures --model aim-tiny --steps 5000 -b 64 -o runs/photos

      mlx-aim train --config pretrain.toml --lr 5e-4

      mlx-aim train --objective lit --model runs/aimv2-nano -o runs/lit   [dim](zero-shot)[/dim]

      mlx.launch -n 2 -- mlx-aim train --data ~/Pictures -b 64   [dim](data parallel)[/dim]

    Ctrl-C, SIGTERM and SIGHUP finish the current step, write a checkpoint and the trunk, and
    exit; running the same command again continues the run.
    """
    from mlx_aim.train import train

    prepare_cpu_backend()
    with reported_errors():
        values = read_config_file(config_file) if config_file is not None else {}
        for name, value in flags.items():
            explicit = getattr(ctx.get_parameter_source(name), "name", "") != "DEFAULT"
            if name not in values or explicit:
                values[name] = value
        train(TrainConfig.from_dict(values, "flags"))


train_command.__signature__ = inspect.Signature(_parameters())


def register(app: typer.Typer) -> None:
    """Add ``mlx-aim train`` to ``app``."""
    app.command(
        "train",
        epilog=exit_codes_help(
            ExitCode.OK,
            ExitCode.BAD_INPUT,
            ExitCode.USAGE,
            ExitCode.OUTPUT,
            ExitCode.NON_FINITE,
            ExitCode.HANGUP,
            ExitCode.INTERRUPTED,
            ExitCode.TERMINATED,
        ),
    )(train_command)
