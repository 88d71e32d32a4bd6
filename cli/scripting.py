"""What makes a script in ``scripts/`` behave like an ``mlx-aim`` command.

``ArgumentParser``: the whole module docstring as the help, every default and choice shown, the
exit-code table at the end, and a usage error as one ``error:`` line with exit code 2.
``run_script(main)``: the commands' error path (:func:`~mlx_aim_cli.errors.reported_errors`), so a
bad value is one ``error:`` line with the documented exit code and Ctrl-C exits with 130.
``command_app(module)``: a Typer app of one ``mlx-aim`` command, whose usage line is the script's
own (``benchmark.py [OPTIONS]``, not ``benchmark.py bench [OPTIONS]``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from types import ModuleType
from typing import NoReturn

import typer

from mlx_aim.errors import ExitCode, exit_codes_help

from .errors import fail, reported_errors


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help; the description and epilog as written."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with the commands' conventions (see the module docstring)."""

    def __init__(self, doc: str, codes: tuple[ExitCode, ...] = (), **kwargs) -> None:
        """``doc``: the script's docstring; ``codes``: the exit codes it can return (all if empty)."""
        super().__init__(
            description=doc.strip(),
            epilog=exit_codes_help(*codes),
            formatter_class=_HelpFormatter,
            **kwargs,
        )

    def error(self, message: str) -> NoReturn:
        """One ``error:`` line (with where to look) and exit code 2, as the commands do."""
        fail(f"{message} (see {self.prog} --help)")
        sys.exit(int(ExitCode.USAGE))


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run_script(main: Callable[[], object]) -> NoReturn:
    """Run a script's ``main`` on the commands' error path and exit with its code."""
    try:
        with reported_errors():
            main()
    except typer.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(int(ExitCode.OK))


def command_app(module: ModuleType) -> typer.Typer:
    """A Typer app holding only ``module``'s command (``module.register(app)``)."""
    app = typer.Typer(add_completion=False, rich_markup_mode="rich", pretty_exceptions_enable=False)
    module.register(app)
    return app
