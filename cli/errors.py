"""One-line error reporting shared by the sub-commands."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from mlx_aim.hub import HubError
from mlx_aim.models.base import ConfigError
from mlx_aim.weights import WeightsError

err_console = Console(stderr=True)

# Exit codes shared by every command.
EXIT_OK = 0
EXIT_BAD_INPUT = 1

USER_ERRORS = (
    ConfigError,
    WeightsError,
    HubError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    KeyError,
    ImportError,
)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise."""
    err_console.print(
        f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True
    )
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected user errors (bad files, configs, names) into one line and exit code 1.

    Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise fail(str(message)) from None
