"""Whether the native CPU kernels may run: their switch and the tools that build them, read without
importing MLX, so that ``mlx_aim.cpu.blas`` can ask before MLX loads."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from ..env import env_flag

ENV_VAR = "MLX_AIM_NATIVE"


def switched_off() -> bool:
    """Whether ``MLX_AIM_NATIVE`` turns the native kernels off (0, false, off, no, none)."""
    return not env_flag(ENV_VAR)


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
