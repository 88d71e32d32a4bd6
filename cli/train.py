"""``mlx-aim train``: AIM pre-training; its flags are generated from ``TrainConfig``'s fields."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand

from mlx_aim.train.config import TrainConfig, read_config_file
from mlx_aim.train.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, Interrupted, TrainError

from .errors import err_console, fail
from .main import app
from .options import config_options

_SHORT = {"data": "-d", "model": "-m", "output": "-o", "steps": "-n", "batch_size": "-b"}


class _TrainCommand(TyperCommand):
    """Usage errors exit with code 1 here: code 2 means "stopped on a non-finite loss"."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except Exception as e:  # click's UsageError (Typer may vendor its own click)
            if any(kind.__name__ == "UsageError" for kind in type(e).__mro__):
                e.exit_code = EXIT_BAD_INPUT
            raise


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
    """Pre-train an AIM model (next-patch prediction of normalized pixels) on your images.

    With no arguments: pre-trains [bold]aim-nano[/bold] on the built-in digits in a few minutes.
    The output directory (default runs/<model>) gets checkpoints/, metrics.jsonl, previews/,
    loss.png, run.json and the trained trunk, ready for [bold]mlx-aim probe --model DIR[/bold],
    [bold]mlx-aim embed --model DIR[/bold] and mlx_aim.load(DIR). Running a command again on an
    output directory that holds a checkpoint continues that run.

    [bold]Examples[/bold]

      mlx-aim train

      mlx-aim train --data ~/Pictures --model aim-tiny --steps 5000 -b 64 -o runs/photos

      mlx-aim train --config pretrain.toml --lr 5e-4

      mlx.launch -n 2 -- mlx-aim train --data ~/Pictures -b 64   [dim](data parallel)[/dim]

    [bold]Exit codes[/bold]: 0 done, 1 bad input or usage, 2 stopped on a non-finite loss or
    gradient, 3 output directory not writable, full or in use by another run, 130 interrupted.
    """
    from mlx_aim.train import train

    try:
        values = read_config_file(config_file) if config_file is not None else {}
        for name, value in flags.items():
            explicit = getattr(ctx.get_parameter_source(name), "name", "") != "DEFAULT"
            if name not in values or explicit:
                values[name] = value
        train(TrainConfig.from_dict(values, "flags"))
    except Interrupted as e:
        err_console.print(str(e), highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except TrainError as e:
        raise fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", EXIT_INTERRUPTED) from None


train_command.__signature__ = inspect.Signature(_parameters())
app.command("train", cls=_TrainCommand)(train_command)
