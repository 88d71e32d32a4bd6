"""AIM pre-training: ``train(TrainConfig(...))`` or ``mlx-aim train`` (see ``run.py``).

Errors are those of :mod:`mlx_aim.errors` (one exit-code table for every command).
"""

from .config import TrainConfig, read_config_file
from .run import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "read_config_file", "train"]
