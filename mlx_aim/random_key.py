"""MLX's global random key as two integers: read, set, and kept unchanged around a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mlx.core as mx
import numpy as np


def random_key() -> list[int]:
    """The global key (two uint32) that the next draw without ``key=`` splits."""
    return np.array(mx.random.state[0]).tolist()


def set_random_key(key: list[int]) -> None:
    """Set the global key; ``seed(s)`` makes it ``(s >> 32, s % 2**32)``."""
    mx.random.seed((int(key[0]) << 32) | int(key[1]))
    if random_key() != [int(k) for k in key]:
        raise ValueError("this MLX version seeds differently; cannot restore the random state")


@contextlib.contextmanager
def unchanged_random_key() -> Iterator[None]:
    """Run a block that draws from the global key (building a model) without consuming it."""
    key = random_key()
    try:
        yield
    finally:
        set_random_key(key)
