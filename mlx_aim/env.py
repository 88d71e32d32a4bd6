"""The environment variables mlx-aim reads: on/off switches and the cache folder.

Imports nothing heavy (``mlx_aim.cpu.blas`` reads its switch before MLX loads).
"""

from __future__ import annotations

import os
from pathlib import Path

# Values that turn a switch off, in any case and with spaces around them.
OFF_VALUES = frozenset({"0", "false", "off", "no", "none"})
CACHE_VAR = "MLX_AIM_CACHE"


def env_flag(name: str, default: bool = True, *, old_name: str | None = None) -> bool:
    """Whether the switch ``name`` is on: off for 0, false, off, no or none; ``default`` when it
    is unset or blank; on for any other value. ``old_name``, a former name of the switch, is read
    when ``name`` is unset."""
    value = os.environ.get(name)
    if value is None and old_name is not None:
        value = os.environ.get(old_name)
    value = (value or "").strip().lower()
    if not value:
        return default
    return value not in OFF_VALUES


def cache_root() -> Path:
    """mlx-aim's cache folder: ``$MLX_AIM_CACHE``, else ``~/.cache/mlx-aim`` (features, built-in
    datasets and native kernels each have a subfolder)."""
    return Path(os.environ.get(CACHE_VAR) or os.path.join("~", ".cache", "mlx-aim")).expanduser()
