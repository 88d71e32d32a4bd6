"""The errors mlx-aim reports to users, and the one exit-code table every command shares.

| code | meaning |
|---:|---|
| 0 | done |
| 1 | bad input: an option, config, model, checkpoint or data that cannot be used; nothing written |
| 2 | usage: unknown flag, missing argument (reported by the command-line parser) |
| 3 | output: destination exists (no ``--force``), not writable, disk full, locked by another run |
| 4 | partial: some inputs were unreadable and skipped; everything else was processed and written |
| 5 | training stopped: the loss or a gradient became NaN or infinite (last good checkpoint kept) |
| 129 / 130 / 143 | stopped by SIGHUP / Ctrl-C (SIGINT) / SIGTERM after writing a checkpoint |

Every error is a :class:`MlxAimError` whose ``str`` is one line naming the file and what is wrong.
"""

from __future__ import annotations

import signal
from enum import IntEnum

from .messages import printable


class ExitCode(IntEnum):
    """Exit status of every ``mlx-aim`` command (see the module docstring)."""

    OK = 0
    BAD_INPUT = 1
    USAGE = 2
    OUTPUT = 3
    PARTIAL = 4
    NON_FINITE = 5
    HANGUP = 128 + signal.SIGHUP
    INTERRUPTED = 128 + signal.SIGINT
    TERMINATED = 128 + signal.SIGTERM


_MEANINGS = {
    ExitCode.OK: "done",
    ExitCode.BAD_INPUT: "bad input",
    ExitCode.USAGE: "usage",
    ExitCode.OUTPUT: "output (exists, not writable, disk full, locked)",
    ExitCode.PARTIAL: "some inputs skipped",
    ExitCode.NON_FINITE: "non-finite loss",
    ExitCode.HANGUP: "SIGHUP",
    ExitCode.INTERRUPTED: "Ctrl-C",
    ExitCode.TERMINATED: "SIGTERM",
}
_SIGNALS = (ExitCode.HANGUP, ExitCode.INTERRUPTED, ExitCode.TERMINATED)


def exit_codes_help(*codes: ExitCode) -> str:
    """One line listing the exit codes a command can return (all of them without arguments)."""
    chosen = sorted(set(codes or ExitCode))
    parts = [f"{int(c)} {_MEANINGS[c]}" for c in chosen if c not in _SIGNALS]
    signals = [c for c in chosen if c in _SIGNALS]
    if signals:
        numbers = "/".join(str(int(c)) for c in signals)
        parts.append(f"{numbers} stopped by {'/'.join(_MEANINGS[c] for c in signals)}")
    return "Exit codes: " + ", ".join(parts) + "."


EXIT_CODES_HELP = exit_codes_help()


def exit_codes_table() -> str:
    """The exit-code table, short enough for an 80-column terminal (``mlx-aim --help``)."""
    rows = (
        ("0", "done"),
        ("1", "bad input: an option, config, model or data that cannot be used"),
        ("2", "usage: unknown flag, missing argument"),
        ("3", "output: exists (no --force), not writable, disk full, locked"),
        ("4", "partial: unreadable inputs skipped and named, the rest done"),
        ("5", "training stopped: non-finite loss or gradient (checkpoint kept)"),
        ("129/130/143", "stopped by SIGHUP / Ctrl-C / SIGTERM"),
    )
    lines = [f"{code:>11}  {meaning}" for code, meaning in rows]
    return "Exit codes (each command's --help lists the ones it returns):\n\n" + "\n".join(lines)


class MlxAimError(Exception):
    """An error a user can act on; ``str(e)`` is one line, ``exit_code`` what the CLI returns."""

    exit_code: int = ExitCode.BAD_INPUT

    def __init__(self, message: object, exit_code: int | None = None):
        super().__init__(printable(" ".join(str(message).split())))
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(MlxAimError, ValueError):
    """An option, config, model, checkpoint or data file that cannot be used."""


class OutputError(MlxAimError, OSError):
    """A destination that cannot be written: exists, read-only, full, locked."""

    exit_code = ExitCode.OUTPUT


class NonFiniteError(MlxAimError):
    """The training loss or gradient norm became NaN or infinite."""

    exit_code = ExitCode.NON_FINITE

    def __init__(self, message: object, step: int):
        super().__init__(message)
        self.step = step


class Interrupted(MlxAimError):
    """Stopped by a signal after saving what could be saved; ``exit_code`` is 128 + the signal."""

    exit_code = ExitCode.INTERRUPTED

    def __init__(self, message: object, signum: int = signal.SIGINT):
        super().__init__(message, 128 + int(signum))
        self.signum = int(signum)
