"""Reuse freed buffers on MLX's CPU backend, as MLX's Metal backend does by default.

MLX's CPU allocator keeps at most 32 MiB of freed buffers for reuse; Metal's keeps up to its
memory limit. A training step frees and reallocates its activations and gradients every step, so on
the CPU each large allocation gets fresh pages that the kernel must zero: about 7% of a vit-s
training step on the 2-core machine of docs/performance.md. ``reuse_freed_buffers`` raises the CPU
cache limit to a quarter of MLX's memory limit (which is 0.8 x RAM), unless the program set a limit
of its own. The cost is memory: up to that much of freed buffers stays with the process, which
raises a training run's resident memory above its MLX peak. ``MLX_AIM_CPU_CACHE_MB`` trades one
for the other: a number of MiB to keep (``32`` is MLX's own default; ``0`` keeps none), or ``auto``
(the default).
"""

from __future__ import annotations

import logging
import os

import mlx.core as mx

MLX_DEFAULT_CPU_CACHE_LIMIT = 32 << 20  # CommonAllocator's default
ENV_VAR = "MLX_AIM_CPU_CACHE_MB"

logger = logging.getLogger("mlx_aim")


def chosen_cache_limit() -> int | None:
    """The cache limit in bytes ``MLX_AIM_CPU_CACHE_MB`` asks for, or None for ``auto`` (unset,
    empty, or not a whole number of MiB, which is warned about)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value.isdigit():
        return int(value) << 20
    logger.warning("%s=%r is not a number of MiB nor 'auto': using auto", ENV_VAR, value)
    return None


def reuse_freed_buffers() -> int | None:
    """On the CPU backend, set MLX's buffer-cache limit (see the module docstring); returns the
    new limit in bytes, or None when nothing changed (another backend, or a limit the program set).
    """
    if mx.default_device() != mx.cpu:
        return None
    previous = mx.set_cache_limit(MLX_DEFAULT_CPU_CACHE_LIMIT)
    if previous != MLX_DEFAULT_CPU_CACHE_LIMIT:  # somebody chose a limit: keep it
        mx.set_cache_limit(previous)
        return None
    limit = chosen_cache_limit()
    if limit is None:
        memory_limit = mx.set_memory_limit(1 << 62)  # read the limit, then put it back
        mx.set_memory_limit(memory_limit)
        limit = max(MLX_DEFAULT_CPU_CACHE_LIMIT, memory_limit // 4)
    mx.set_cache_limit(limit)
    return limit
