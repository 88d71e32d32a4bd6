"""mlx-aim: Apple's AIM and AIMv2 autoregressive image models in MLX.

>>> import mlx_aim
>>> model = mlx_aim.load("aimv2-large-patch14-224")   # or a directory written by mlx-aim
"""

from .blas import enable_fast_blas

enable_fast_blas()  # must run before anything imports mlx.core (see blas.py)

from .loading import load  # noqa: E402
from .models import build_model  # noqa: E402
from .registry import REGISTRY, Preprocessing  # noqa: E402
from .tokenizer import load_tokenizer  # noqa: E402
from .weights import save_model  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "REGISTRY",
    "Preprocessing",
    "build_model",
    "load",
    "load_tokenizer",
    "save_model",
    "__version__",
]
