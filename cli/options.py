"""Command-line flags generated from a settings dataclass: one ``typer.Option`` per field.

Each field carries its help text and, optionally, its help panel and flag name in ``metadata``
(``{"help": ..., "panel": ..., "flag": ...}``); a field named ``batch_size`` becomes
``--batch-size`` (``"flag": "json"`` makes ``as_json`` ``--json``), and one that defaults to
``True`` becomes a ``--name/--no-name`` switch. ``train``, ``probe``, ``embed`` and ``zero-shot``
build their flags this way from ``TrainConfig``, ``ProbeConfig``, ``EmbedConfig`` and
``ZeroShotConfig``.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any, Optional

import typer


def _annotation(kind: Any) -> Any:
    """``X | None`` as ``Optional[X]`` (what Typer understands on every Python version)."""
    args = typing.get_args(kind)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[inner]  # noqa: UP045
    return kind


def config_options(config: type, short: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """Keyword-only parameters, one per field of the dataclass ``config``, for a command signature.

    ``short`` maps field names to short flags (``{"batch_size": "-b"}``).
    """
    short = short or {}
    hints = typing.get_type_hints(config)
    params = []
    for f in dataclasses.fields(config):
        flag = f.metadata.get("flag", f.name).replace("_", "-")
        flag = f"--{flag}/--no-{flag}" if f.default is True else f"--{flag}"
        names = [flag] + ([short[f.name]] if f.name in short else [])
        option = typer.Option(
            f.default, *names, help=f.metadata["help"], rich_help_panel=f.metadata.get("panel")
        )
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=option,
                annotation=_annotation(hints[f.name]),
            )
        )
    return params


def with_config_options(
    command: Callable[..., Any], config: type, short: dict[str, str] | None = None
) -> None:
    """Give ``command`` (whose last parameter is ``**settings``) its declared parameters followed
    by the flags of ``config`` (see :func:`config_options`)."""
    declared = list(inspect.signature(command).parameters.values())[:-1]  # all but **settings
    command.__signature__ = inspect.Signature(declared + config_options(config, short))
