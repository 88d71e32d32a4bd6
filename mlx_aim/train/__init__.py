"""AIM pre-training: ``train(TrainConfig(...))`` or ``mlx-aim train`` (see ``loop.py``)."""

from .config import TrainConfig, read_config_file
from .errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NON_FINITE,
    EXIT_OK,
    EXIT_OUTPUT,
    BadInputError,
    Interrupted,
    NonFiniteError,
    OutputError,
    TrainError,
)
from .loop import TrainResult, train

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_NON_FINITE",
    "EXIT_OK",
    "EXIT_OUTPUT",
    "BadInputError",
    "Interrupted",
    "NonFiniteError",
    "OutputError",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "read_config_file",
    "train",
]
