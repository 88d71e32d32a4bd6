"""A float32 copy of an index's vectors beside it (``<db>.vectors``), memory-mapped by searches.

Reading every vector out of SQLite and converting it to float32 takes seconds for 100,000 images;
mapping this file takes milliseconds. It is written by the first search after the index changed
(atomically, through :mod:`mlx_aim.io`) and is valid only for the database generation it names:
every write transaction of the index increments the generation, so a stale copy is never used.
Deleting it is always safe.

Layout: a magic line, a JSON line (generation, count, dim, bytes of the paths), the paths joined by
NUL bytes (no file name contains one), then the (count, dim) float32 matrix at a 64-byte boundary.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from ..errors import MlxAimError
from ..io import atomic_write

MAGIC = b"mlx-aim index vectors 1\n"
_ALIGN = 64


def cache_path(db: Path) -> Path:
    """Where the vectors of ``db`` are cached."""
    return db.with_name(db.name + ".vectors")


def _matrix_offset(header: int, paths: int) -> int:
    return -(-(header + paths) // _ALIGN) * _ALIGN


def read_cache(db: Path, generation: str, dim: int) -> tuple[list[bytes], np.ndarray] | None:
    """The cached paths and float32 vectors of ``generation``, or None (absent, stale, broken)."""
    path = cache_path(db)
    try:
        with open(path, "rb") as f:
            if f.readline() != MAGIC:
                return None
            head = json.loads(f.readline())
            if (str(head["generation"]), int(head["dim"])) != (generation, dim):
                return None
            count, start = int(head["count"]), f.tell()
            blob = f.read(int(head["paths"]))
            offset = _matrix_offset(start, len(blob))
            if path.stat().st_size != offset + count * dim * 4 or len(blob) != head["paths"]:
                return None
        paths = blob.split(b"\0") if count else []
        if len(paths) != count:
            return None
        if count == 0:
            return [], np.zeros((0, dim), np.float32)
        return paths, np.memmap(path, np.float32, "r", offset, (count, dim))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cache(db: Path, generation: str, paths: list[bytes], matrix: np.ndarray) -> None:
    """Write the cache of ``generation`` (best effort: a read-only folder just goes without)."""
    blob = b"\0".join(paths)
    head = {"generation": generation, "count": len(paths), "dim": matrix.shape[1]}
    line = MAGIC + json.dumps({**head, "paths": len(blob)}).encode() + b"\n"
    padding = _matrix_offset(len(line), len(blob)) - len(line) - len(blob)
    with contextlib.suppress(OSError, MlxAimError):
        with atomic_write(cache_path(db)) as f:
            f.write(line + blob + b"\0" * padding)
            f.write(memoryview(np.ascontiguousarray(matrix, np.float32)).cast("B"))
