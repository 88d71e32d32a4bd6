"""mlx-aim: Apple's AIM and AIMv2 autoregressive image models in MLX.

>>> import mlx_aim
>>> model = mlx_aim.load("aimv2-large-patch14-224")   # or a directory written by mlx-aim
"""

import importlib

from .cpu.blas import enable_fast_blas

enable_fast_blas()  # must run before anything imports mlx.core (see cpu/blas.py)

__version__ = "0.1.0"
# The API is imported on first use, so that importing a submodule that needs no MLX (the
# benchmark's torch worker) does not load mlx.core.
_API = {
    "REGISTRY": "checkpoints.registry",
    "Preprocessing": "data.transforms",
    "build_model": "models",
    "load": "checkpoints.loading",
    "load_tokenizer": "text.clip_tokenizer",
    "save_model": "checkpoints.weights",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'mlx_aim' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
