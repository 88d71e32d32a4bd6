"""mlx-aim: Apple's AIM and AIMv2 autoregressive image models in MLX.

>>> import mlx_aim
>>> model = mlx_aim.load("aimv2-large-patch14-224")   # or a directory written by mlx-aim
"""

from .loading import load
from .models import build_model
from .registry import REGISTRY, Preprocessing
from .weights import save_model

__version__ = "0.1.0"
__all__ = ["REGISTRY", "Preprocessing", "build_model", "load", "save_model", "__version__"]
