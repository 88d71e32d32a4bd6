"""Batch parallelism over CPU streams.

MLX's CPU backend runs the operations of each stream on a thread of its own, and on x86 most of its
elementwise kernels run on a single core; only the BLAS matmuls use several. A batch split into
chunks that run on separate CPU streams keeps every core busy: on the 2-core benchmark machine this
is 1.3-1.8x faster for inference than one stream with a 2-thread BLAS. Each chunk's BLAS calls then
get ``cores // streams`` threads. Rows are computed independently, so the results equal one
stream's up to float rounding (a matmul may round differently for a different number of rows).

Inference uses it (``features.BatchRunner``: embeddings, probe features); the training step does
not, as its backward pass measured no faster split this way.

``MLX_AIM_CPU_STREAMS`` sets the number of streams (1: no splitting); the default is the number of
usable cores, at most 8. GPU backends (Metal, CUDA) always use one stream.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx.utils import tree_map

from .blas import blas_threads

ENV_VAR = "MLX_AIM_CPU_STREAMS"
MAX_STREAMS = 8


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_stream_count(batch_size: int) -> int:
    """Streams a batch of ``batch_size`` is split over: 1 unless the default device is the CPU."""
    if mx.default_device() != mx.cpu:
        return 1
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting:
        try:
            wanted = int(setting)
        except ValueError:
            raise ValueError(f"{ENV_VAR} must be a whole number, got {setting!r}") from None
        if wanted < 1:
            raise ValueError(f"{ENV_VAR} must be >= 1, got {wanted}")
    else:
        wanted = min(usable_cores(), MAX_STREAMS)
    return max(1, min(wanted, batch_size))


_POOL: list[mx.Stream] = []  # shared by every runner: MLX gives each stream a thread for good


def pooled_cpu_streams(count: int) -> list[mx.Stream]:
    """``count`` CPU streams of this process's pool, or none for ``count <= 1`` (work stays on the
    default stream)."""
    if count <= 1:
        return []
    while len(_POOL) < count:
        _POOL.append(mx.new_stream(mx.cpu))
    return _POOL[:count]


def blas_threads_per_stream(count: int) -> int:
    """BLAS threads for each of ``count`` streams running at once: the cores shared out."""
    return max(1, usable_cores() // max(1, count))


class StreamSplit:
    """Apply ``fn`` to a batch as ``streams`` equal chunks, each on a CPU stream of its own.

    ``fn`` maps a (chunk, ...) array to a tree of arrays with the chunk on axis 0; the chunks'
    results are evaluated together and concatenated. The batch size must divide evenly.
    """

    def __init__(self, fn: Callable[[mx.array], Any], streams: int):
        self.fn = fn
        self.streams = pooled_cpu_streams(streams)

    def __call__(self, batch: mx.array) -> Any:
        if not self.streams:
            out = self.fn(batch)
            mx.eval(out)
            return out
        size = math.ceil(batch.shape[0] / len(self.streams))
        if size * len(self.streams) != batch.shape[0]:
            raise ValueError(f"batch of {batch.shape[0]} does not split into {len(self.streams)}")
        outs = []
        with blas_threads(blas_threads_per_stream(len(self.streams))):
            for i, stream in enumerate(self.streams):
                with mx.stream(stream):
                    outs.append(self.fn(batch[i * size : (i + 1) * size]))
            mx.eval(outs)
        return tree_map(lambda *parts: mx.concatenate(parts), *outs)
