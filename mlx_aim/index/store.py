"""The index database: one SQLite file (Python's ``sqlite3``, WAL mode) and its writer lock.

Tables: ``meta`` (key/value: format version, the model's identity, the vector width and type) and
``files`` (one row per image: absolute path as file-system bytes, size, mtime in ns, content hash,
unit-norm embedding as a float16 or float32 BLOB). Writers commit in short transactions, so a
killed writer loses at most the one in flight; readers never wait for a writer (WAL).

One writer at a time: :class:`WriterLock` holds an ``flock`` on ``<db>.lock`` (released by the
kernel when the process dies, even by ``kill -9``) and records the holder (pid, host) in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError
from ..io import os_reason
from .cache import read_cache, write_cache

FORMAT = "mlx-aim-index"
VERSION = 1
VECTOR_TYPES = {"float16": np.float16, "float32": np.float32}
_READ_CHUNK = 8192  # rows fetched at a time when loading vectors

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash BLOB NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS files_hash ON files (hash);
"""


@dataclass(frozen=True)
class Entry:
    """What the index knows of a file: size, modification time (ns) and content hash."""

    size: int
    mtime_ns: int
    hash: bytes


def rebuild_hint(path: Path) -> str:
    return (
        f"delete {path} (and its -wal, -shm and .vectors files) and run mlx-aim index again to "
        "rebuild it"
    )


def _sqlite_header(path: Path) -> bool:
    """Whether ``path`` starts as an SQLite database does."""
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


class Store:
    """An open index database. ``Store(path, create=True)`` makes the file if needed.

    Every SQLite failure becomes one line naming the database: a damaged file is an
    :class:`InputError` saying how to rebuild it, one that cannot be written an :class:`OutputError`.
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InputError(f"{self.path}: no index here; build one with mlx-aim index first")
        if create:
            with contextlib.suppress(OSError):
                self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.guard():
            self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            if create:
                self.conn.executescript(_SCHEMA)
            self.meta = self._read_meta()
        if self.meta and self.meta.get("format") != FORMAT:
            raise InputError(f"{self.path}: not an mlx-aim index (a different SQLite database)")

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn SQLite errors into one-line mlx-aim errors naming the database."""
        try:
            yield
        except sqlite3.OperationalError as e:
            text = str(e)
            if "locked" in text or "busy" in text:
                raise OutputError(f"{self.path}: the database is locked ({text})") from None
            if "no such table" in text:
                raise InputError(
                    f"{self.path}: not an mlx-aim index (no {text[15:]} table)"
                ) from None
            if "readonly" in text or "unable to open" in text or "disk" in text:
                raise OutputError(f"cannot write {self.path}: {text}") from None
            raise InputError(
                f"{self.path}: damaged index ({text}); {rebuild_hint(self.path)}"
            ) from None
        except sqlite3.DatabaseError as e:
            if not _sqlite_header(self.path):  # some other file: never advise deleting it
                raise InputError(
                    f"{self.path}: not an mlx-aim index (not an SQLite database); give another --db"
                ) from None
            raise InputError(
                f"{self.path}: damaged index ({e}); {rebuild_hint(self.path)}"
            ) from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), committed at the end of the block."""
        with self.guard():
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute(  # invalidates the cached vectors (cache.py)
                    "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"
                )
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def _read_meta(self) -> dict[str, str]:
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master")}
        if "meta" not in tables:
            if tables:
                raise InputError(f"{self.path}: not an mlx-aim index (a different SQLite database)")
            return {}
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    # ---- identity ----------------------------------------------------------------------------

    @property
    def identity(self) -> dict | None:
        """The model identity the vectors were made with (``model``, ``digest``, ``pool``)."""
        return json.loads(self.meta["model"]) if "model" in self.meta else None

    @property
    def vector_type(self) -> np.dtype:
        return np.dtype(VECTOR_TYPES[self.meta.get("vectors", "float16")])

    def claim(self, identity: dict, vectors: str = "float16") -> None:
        """Record the model of a new index, or refuse one made with another model."""
        known = self.identity
        if known is None:
            if vectors not in VECTOR_TYPES:
                raise InputError(f"vectors must be float16 or float32, not {vectors!r}")
            meta = {"format": FORMAT, "version": str(VERSION), "model": json.dumps(identity)}
            meta.update(vectors=vectors, generation="0")
            with self.transaction() as db:
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
            self.meta = meta
            return
        keys = [k for k in ("digest", "pool", "dim") if k in identity]
        same = all(known.get(k) == identity[k] for k in keys)
        if not same:
            raise InputError(
                f"{self.path} holds embeddings of {known.get('model')} ({known.get('pool')} "
                f"pooling, weights {known.get('digest', '?')[:12]}), not of {identity.get('model')} "
                f"({identity.get('pool')} pooling, weights {identity.get('digest', '?')[:12]}); "
                "use another --db for this model"
            )

    # ---- rows --------------------------------------------------------------------------------

    def entries(self) -> dict[bytes, Entry]:
        """Every indexed path (file-system bytes) with its size, mtime and hash."""
        with self.guard():
            rows = self.conn.execute("SELECT path, size, mtime_ns, hash FROM files")
            return {p: Entry(s, m, h) for p, s, m, h in rows}

    def holds(self, path: bytes) -> bool:
        """Whether ``path`` (absolute, file-system bytes) is indexed."""
        with self.guard():
            row = self.conn.execute("SELECT 1 FROM files WHERE path = ?", (path,))
            return row.fetchone() is not None

    def count(self) -> int:
        with self.guard():
            return self.conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]

    def put(self, db: sqlite3.Connection, rows: Iterable[tuple[bytes, Entry, np.ndarray]]) -> None:
        """Insert or replace rows (inside a :meth:`transaction`)."""
        kind = self.vector_type
        db.executemany(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
            ((p, e.size, e.mtime_ns, e.hash, np.asarray(v, kind).tobytes()) for p, e, v in rows),
        )

    def vectors(self) -> tuple[list[bytes], np.ndarray]:
        """Every path and its vector as float32 (N, D) (the accumulation type of the search,
        converted once, not per query): memory-mapped from the cache beside the database when it
        is current (:mod:`mlx_aim.index.cache`), else read from SQLite and cached."""
        dim = int(self.identity["dim"]) if self.identity else 0
        with self.guard():
            self.conn.execute("BEGIN")  # one snapshot for the generation, the count and the rows
            try:
                row = self.conn.execute("SELECT value FROM meta WHERE key = 'generation'")
                generation = (row.fetchone() or [None])[0]
                cached = read_cache(self.path, generation, dim) if generation else None
                if cached is not None:
                    return cached
                paths, out = self._read_vectors(dim)
            finally:
                self.conn.execute("COMMIT")
        if generation:
            write_cache(self.path, generation, paths, out)
        return paths, out

    def _read_vectors(self, dim: int) -> tuple[list[bytes], np.ndarray]:
        kind = self.vector_type
        paths: list[bytes] = []
        out = np.empty((self.count(), dim), np.float32)
        cursor = self.conn.execute("SELECT path, vector FROM files")
        while rows := cursor.fetchmany(_READ_CHUNK):
            blob = b"".join(r[1] for r in rows)
            out[len(paths) : len(paths) + len(rows)] = np.frombuffer(blob, kind).reshape(-1, dim)
            paths.extend(r[0] for r in rows)
        return paths, out

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()


class WriterLock:
    """The lock of the one process updating an index: ``flock`` on ``<db>.lock``.

    ``acquire(wait=False)`` raises :class:`OutputError` (exit code 3) naming the holder, or waits
    for it with ``wait=True``.
    """

    def __init__(self, db: Path):
        self.path = db.with_name(db.name + ".lock")
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> WriterLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot open {self.path}: {os_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            db = self.path.with_name(self.path.name.removesuffix(".lock"))
            raise OutputError(
                f"{db} is being updated by another mlx-aim index ({holder}); wait for it to finish "
                "(or pass --wait), or use another --db"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
