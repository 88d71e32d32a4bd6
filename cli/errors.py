"""The one output, error and exit-code path of every ``mlx-aim`` command.

Each command body runs inside :func:`reported_errors`: a :class:`~mlx_aim.errors.MlxAimError`
(and the few standard errors that mean bad input or output) becomes one ``error: ...`` line on
stderr and the exit code of the shared table in :mod:`mlx_aim.errors`. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from mlx_aim.errors import EXIT_CODES_HELP, ExitCode, MlxAimError, exit_codes_help
from mlx_aim.io import os_reason, output_error
from mlx_aim.messages import printable

err_console = Console(stderr=True)

__all__ = [
    "EXIT_CODES_HELP",
    "IMAGE_COMMAND_EXITS",
    "ExitCode",
    "err_console",
    "fail",
    "reported_errors",
    "warn",
    "prepare_cpu_backend",
]

# The exit codes of the commands that read images and skip the unreadable ones (their --help).
IMAGE_COMMAND_EXITS = exit_codes_help(
    ExitCode.OK,
    ExitCode.BAD_INPUT,
    ExitCode.USAGE,
    ExitCode.OUTPUT,
    ExitCode.PARTIAL,
    ExitCode.INTERRUPTED,
)

# Standard errors that still reach a command from libraries; they mean bad input.
_INPUT_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, KeyError, ImportError)


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr (one line, shown even with --quiet)."""
    err_console.print(
        f"[bold yellow]warning:[/bold yellow] {escape(printable(message))}",
        highlight=False,
        soft_wrap=True,
    )


@functools.cache
def prepare_cpu_backend() -> None:
    """Once per process: let MLX's CPU backend reuse freed buffers (``mlx_aim.cpu.memory``) and warn
    when its matmuls run on the reference BLAS of its Linux wheel (~8x slower).

    Call it at the start of a command that computes, after ``mlx_aim`` is imported.
    """
    import mlx.core as mx

    from mlx_aim.cpu.blas import blas_info
    from mlx_aim.cpu.memory import reuse_freed_buffers

    reuse_freed_buffers()

    on_linux_cpu = sys.platform.startswith("linux") and mx.default_device().type == mx.cpu
    if on_linux_cpu and blas_info() is None:
        warn(
            "MLX runs its CPU matmuls on the slow reference BLAS of its wheel (about 8x slower); "
            "fix: sudo apt-get install libopenblas0-pthread (or pip install 'mlx-aim[fast-cpu]')"
        )


def fail(message: str, code: int = ExitCode.BAD_INPUT) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise."""
    err_console.print(
        f"[bold red]error:[/bold red] {escape(printable(message))}",
        highlight=False,
        soft_wrap=True,
    )
    return typer.Exit(int(code))


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Turn user errors into one ``error:`` line and the shared exit code."""
    try:
        try:
            yield
        finally:
            sys.stdout.flush()  # a pipe closed early fails here, inside the handlers below
    except MlxAimError as e:
        raise fail(str(e), e.exit_code) from None
    except BrokenPipeError:  # the reader went away (``mlx-aim embed --json | head``): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush
        raise typer.Exit(int(ExitCode.OK)) from None
    except _INPUT_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise fail(str(message)) from None
    except OSError as e:  # an output that cannot be written (exists, read-only, full)
        message = str(output_error(e.filename, e)) if e.filename else os_reason(e)
        raise fail(message, ExitCode.OUTPUT) from None
    except KeyboardInterrupt:
        raise fail("interrupted", ExitCode.INTERRUPTED) from None
