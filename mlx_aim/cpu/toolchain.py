"""Whether the native CPU kernels may run: their switch and the tools that build them, read without
importing MLX, so that ``mlx_aim.cpu.blas`` can ask before MLX loads."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

ENV_VAR = "MLX_AIM_NATIVE"
_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes", "")


def switched_off() -> bool:
    """Whether ``MLX_AIM_NATIVE`` turns the native kernels off (0, false, off, no); any value but
    those and 1, true, on, yes is warned about (once) and leaves them on."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in _OFF + _ON:
        _warn_unknown(value)
    return value in _OFF


@functools.cache
def _warn_unknown(value: str) -> None:
    logging.getLogger("mlx_aim").warning(
        "%s=%s is not a known value (0/false/off/no or 1/true/on/yes); the native kernels stay on",
        ENV_VAR,
        ascii(value),
    )


def cmake_path() -> str | None:
    """cmake on PATH, or the one the ``cmake`` wheel put next to this Python."""
    return shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))


def missing_build_tools() -> list[str]:
    """What the native kernels' build lacks here: nanobind, cmake, a C++ compiler (empty: none)."""
    missing = [] if importlib.util.find_spec("nanobind") else ["nanobind"]
    if cmake_path() is None:
        missing.append("cmake")
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c):
        missing.append("a C++ compiler")
    return missing
