"""Time exact search over an index: loading the vectors from SQLite and scanning them per query.

    python scripts/bench_search.py                      # 100k and 1M vectors of 768 and 1024
    python scripts/bench_search.py --sizes 100000 --dims 768 --repeats 20

For each size N and width D: random unit vectors stored as float16 (the index's default) and held
in memory as float32 (as ``Store.vectors`` returns them), the median time of one query
(``mlx_aim.index.query.scores`` + ``top_k``, k=10) over ``--repeats`` queries, and, for sizes up
to ``--sqlite-max``, the time to get the N vectors of an index (``Store.vectors``, what
``mlx-aim search`` does once per run): the first time after a change (read from SQLite, converted,
cached beside the database) and later (the cache memory-mapped). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mlx_aim.index.query import scores, top_k
from mlx_aim.index.store import Entry, Store


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """N random unit vectors (float16), generated in blocks to bound memory."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float16)
    for start in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def query_ms(matrix: np.ndarray, repeats: int) -> float:
    """Median milliseconds of one query (scores of every row, then the top 10)."""
    rng = np.random.default_rng(1)
    times = []
    for _ in range(repeats + 1):
        q = rng.standard_normal(matrix.shape[1]).astype(np.float32)
        q /= np.linalg.norm(q)
        start = time.perf_counter()
        top_k(scores(matrix, q), 10)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])  # the first warms the caches


def load_times(matrix: np.ndarray, folder: Path) -> tuple[float, float]:
    """Seconds to get the vectors of an index holding them: the first search after a change
    (read from SQLite, then cached) and any later one (the cache, memory-mapped and read once)."""
    db = folder / f"bench-{len(matrix)}-{matrix.shape[1]}.sqlite"
    store = Store(db, create=True)
    store.claim({"model": "bench", "digest": "0", "pool": "mean", "dim": matrix.shape[1]})
    entry = Entry(0, 0, b"")
    for start in range(0, len(matrix), 10000):
        with store.transaction() as con:
            rows = (
                (f"/photos/{i:08d}.jpg".encode(), entry, matrix[i])
                for i in range(start, min(start + 10000, len(matrix)))
            )
            store.put(con, rows)
    store.close()
    times = []
    for _ in range(2):
        store = Store(db)
        start = time.perf_counter()
        paths, loaded = store.vectors()
        float(np.asarray(loaded).sum())  # touch every page, as a query does
        times.append(time.perf_counter() - start)
        store.close()
        assert len(paths) == len(matrix) and np.array_equal(
            loaded[:5], matrix[:5].astype(np.float32)
        )
        del loaded
    for file in folder.iterdir():
        file.unlink()
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sqlite-max", type=int, default=1_000_000)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}, numpy {np.__version__}"
    )
    print("| vectors | width | query (ms) | first load (s) | cached load (s) |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for n in args.sizes:
            for dim in args.dims:
                matrix = unit_vectors(n, dim)
                loads = load_times(matrix, Path(folder)) if n <= args.sqlite_max else None
                ms = query_ms(matrix.astype(np.float32), args.repeats)
                shown = "- | -" if loads is None else f"{loads[0]:.2f} | {loads[1]:.2f}"
                print(f"| {n:,} | {dim} | {ms:.1f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
