"""Errors that end a training run, each with the exit code the command line returns.

Exit codes of ``mlx-aim train``: 0 finished, 1 bad input or usage (flags, config file, data,
model, incompatible or unusable checkpoint), 2 stopped on a non-finite loss or gradient, 3 output
directory problem (not writable, full, locked by another run, a failed write), 130 interrupted
(Ctrl-C; a checkpoint was written first).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_NON_FINITE = 2
EXIT_OUTPUT = 3
EXIT_INTERRUPTED = 130


class TrainError(Exception):
    """A run that cannot start or go on; ``str(e)`` is one line naming the cause."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class BadInputError(TrainError):
    """Flags, config file, data, model or checkpoint that cannot be used."""


class NonFiniteError(TrainError):
    """The loss or the gradient norm became NaN or infinite."""

    exit_code = EXIT_NON_FINITE

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class OutputError(TrainError):
    """The output directory cannot be used: not writable, full, or locked by another run."""

    exit_code = EXIT_OUTPUT


class Interrupted(TrainError):
    """The run was interrupted (Ctrl-C) after writing a checkpoint."""

    exit_code = EXIT_INTERRUPTED
