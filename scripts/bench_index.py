"""Time the bookkeeping of ``mlx-aim index`` on a folder of many files, without a model.

    python scripts/bench_index.py                 # 100,000 files in a temporary folder
    python scripts/bench_index.py --files 20000 --folder /tmp/many

Writes N distinct 2x2 PNG files (100 folders), then times ``Index.add`` with an encoder that reads,
hashes and decodes every file as the real one does (``HashingOpener``) but returns a random vector
instead of running a model. So the times are the index's own work: discovery, stat, the diff with
the database, hashing, decoding, SQLite transactions. Reported: the first run (everything new),
a second run (nothing changed), and a run after 100 files were added, 100 deleted, 100 moved.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mlx_aim.data.images import ImageError
from mlx_aim.index import Index


class NullEncoder:
    """Reads every file through the index's opener; a random unit vector instead of a model."""

    identity = {"model": "null", "digest": "0", "pool": "mean", "dim": 768}

    def __init__(self, batch: int = 64):
        self.batch = batch
        self.rng = np.random.default_rng(0)

    def stream(self, paths, on_error, opener):
        for start in range(0, len(paths), self.batch):
            done = []
            for path in paths[start : start + self.batch]:
                try:
                    opener(Path(path))
                    done.append(path)
                except ImageError as e:
                    on_error(e)
            vectors = self.rng.standard_normal((len(done), 768)).astype(np.float32)
            yield done, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_files(folder: Path, n: int, first: int = 0) -> list[Path]:
    """``n`` distinct tiny PNG files (contents numbered from ``first``) in 100 sub-folders."""
    paths = []
    for i in range(first, first + n):
        sub = folder / f"{i % 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = np.frombuffer(i.to_bytes(12, "little"), np.uint8).reshape(2, 2, 3)
        paths.append(sub / f"{i:06d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def timed(index: Index, folder: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = index.add(folder)
    return time.perf_counter() - start, summary.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "photos"
        start = time.perf_counter()
        paths = write_files(folder, args.files)
        print(
            f"wrote {args.files} files in {time.perf_counter() - start:.1f} s (load "
            f"{os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs)"
        )
        index = Index(Path(tmp) / "bench.sqlite", model=NullEncoder())
        for name in ("first run (all new)", "second run (no change)"):
            seconds, summary = timed(index, folder)
            print(f"{name}: {seconds:.2f} s  {summary}")
        for i, path in enumerate(paths[:300]):
            if i < 100:
                path.unlink()
            elif i < 200:
                path.rename(path.with_name("moved-" + path.name))
        write_files(folder / "new", 100, first=args.files)
        seconds, summary = timed(index, folder)
        print(f"after 100 deleted, 100 moved, 100 added: {seconds:.2f} s  {summary}")


if __name__ == "__main__":
    main()
