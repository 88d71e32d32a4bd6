"""Data-parallel helpers over ``mx.distributed``: start-up, broadcast from rank 0, agreement."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import MlxAimError

T = TypeVar("T")

# Variables set by the launchers: mlx.launch (ring, jaccl, nccl) and mpirun.
_LAUNCH_VARS = (
    "MLX_RANK",
    "MLX_HOSTFILE",
    "MLX_WORLD_SIZE",
    "MLX_IBV_DEVICES",
    "MLX_JACCL_COORDINATOR",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """Whether this process was started by ``mlx.launch`` or ``mpirun``."""
    return any(var in os.environ for var in _LAUNCH_VARS)


def init_world() -> World:
    """Join the distributed group when launched as one, else a single-process world."""
    if not launched_distributed():
        return World()
    try:
        group = mx.distributed.init(strict=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError for a backend that cannot start
        raise MlxAimError(f"cannot join the distributed group ({e})") from None
    return World(group.rank(), group.size())


def broadcast(tree, world: World):
    """Rank 0's values of every array in ``tree`` (a no-op in a single process)."""
    if world.size == 1:
        return tree
    flat = []
    for key, value in tree_flatten(tree):
        data = value if world.is_main else mx.zeros_like(value)
        if value.dtype in (mx.uint64, mx.int64, mx.bool_):  # step counters: not every backend
            data = mx.distributed.all_sum(data.astype(mx.int32)).astype(value.dtype)
        else:
            data = mx.distributed.all_sum(data)
        flat.append((key, data))
    out = tree_unflatten(flat)
    mx.eval(out)
    return out


def broadcast_ints(values: list[int], world: World) -> list[int]:
    """Rank 0's list of small integers (same length on every rank)."""
    if world.size == 1:
        return values
    data = mx.array(values if world.is_main else [0] * len(values), dtype=mx.int32)
    return mx.distributed.all_sum(data).tolist()


def gather_ints(values: list[int], world: World) -> list[list[int]]:
    """Every rank's list of small integers, in rank order."""
    if world.size == 1:
        return [values]
    data = mx.distributed.all_gather(mx.array(values, dtype=mx.int32)[None])
    return data.tolist()


def agree(error: MlxAimError | None, world: World) -> None:
    """Raise on every rank when any rank failed (so no rank waits forever in a collective)."""
    if world.size == 1:
        if error is not None:
            raise error
        return
    code = error.exit_code if error is not None else 0
    codes = mx.distributed.all_gather(mx.array([code], dtype=mx.int32)).tolist()
    if error is not None:
        raise error
    failed = [(rank, c) for rank, c in enumerate(codes) if c]
    if failed:
        rank, code = failed[0]
        raise MlxAimError(f"rank {rank} stopped the run (see its error above)", exit_code=code)


def on_every_rank(fn: Callable[[], T], world: World) -> T:
    """Run ``fn`` on every rank; when any rank fails, every rank raises (see ``agree``)."""
    try:
        value = fn()
    except MlxAimError as e:
        agree(e, world)
        raise
    agree(None, world)
    return value


def on_main(fn: Callable[[], T], world: World) -> T | None:
    """Run ``fn`` on rank 0 only (None elsewhere); a failure there stops every rank."""
    return on_every_rank(fn if world.is_main else lambda: None, world)
