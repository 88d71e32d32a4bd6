"""``Index``: an incremental, crash-safe local image index with exact semantic search.

Example::

    from mlx_aim.index import Index

    index = Index("photos.sqlite", model="aimv2-large-patch14-224-lit")
    summary = index.add(["~/Pictures"])              # only new and changed files are embedded
    for hit in index.search("a red boat", k=5):      # text needs a LiT model; images work always
        print(hit.score, hit.path)
    pairs = index.duplicates(threshold=0.95)          # resized / re-encoded copies
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.images import ImageError, find_images
from ..env import cache_root
from ..errors import InputError
from .encoder import Encoder, ModelEncoder, model_source
from .query import combine, parse_terms, scores, similar_pairs, top_k
from .scan import HashingOpener, Plan, plan_update
from .store import Store, WriterLock

DEFAULT_THRESHOLD = 0.95

Bar = Callable[[str, int], Callable[[int], None]]


@dataclass
class Summary:
    """What one :meth:`Index.add` did (``total``: rows in the index afterwards)."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    moved: int = 0
    failed: int = 0
    total: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Hit:
    """A search result: the file and its cosine similarity to the query."""

    path: str
    score: float


@dataclass(frozen=True)
class Pair:
    """Two near-identical images and their cosine similarity."""

    a: str
    b: str
    similarity: float


def default_db(model: str | os.PathLike, pool: str = "auto") -> Path:
    """One database per model: ``$MLX_AIM_CACHE/index/<model>[-<pool>].sqlite``.

    A model folder is named by its folder name and a hash of its absolute path.
    """
    import hashlib

    source = model_source(model)
    name = Path(source).name if os.sep in source else source
    if source != str(model) or os.sep in source:
        name += "-" + hashlib.blake2b(source.encode(), digest_size=4).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    suffix = "" if pool == "auto" else f"-{pool}"
    return cache_root() / "index" / f"{safe}{suffix}.sqlite"


class Index:
    """An image index in one SQLite file (see :mod:`mlx_aim.index.store`).

    ``model`` (a registry name, a model folder, a loaded model, or an :class:`Encoder`) embeds
    images and queries; by default the one the index was built with. ``db`` defaults to
    :func:`default_db` of the model.
    """

    def __init__(
        self,
        db: str | os.PathLike | None = None,
        *,
        model: Any = None,
        pool: str = "auto",
        batch_size: int = 16,
        workers: int = 2,
        vectors: str = "float16",
    ):
        if db is None:
            if model is None or not isinstance(model, (str, os.PathLike)):
                raise InputError("give the database (--db) or the model (--model) of the index")
            db = default_db(model, pool)
        self.db = Path(db).expanduser()
        self.pool, self.batch_size, self.workers, self.vectors = pool, batch_size, workers, vectors
        self._model = model
        self._encoder: Encoder | None = None
        self._loaded: tuple[list[bytes], np.ndarray] | None = None

    # ---- the model ---------------------------------------------------------------------------

    def encoder(self, store: Store) -> Encoder:
        """The model, loaded once (the index's own when none was given), checked against it."""
        if self._encoder is None:
            model = self._model
            if model is None:
                if store.identity is None:
                    raise InputError(f"{self.db}: empty index; give the model to build it with")
                model = store.identity["model"]
            pool = self.pool
            if pool == "auto" and store.identity is not None:
                pool = store.identity["pool"]  # the pooling the index was built with
            if hasattr(model, "identity") and hasattr(model, "stream"):
                self._encoder = model
            else:
                self._encoder = ModelEncoder(
                    model, pool=pool, batch_size=self.batch_size, workers=self.workers
                )
        if store.identity is not None:
            store.claim(self._encoder.identity)  # refuses another model
        return self._encoder

    # ---- adding ------------------------------------------------------------------------------

    def add(
        self,
        paths: Sequence[str | os.PathLike] | str | os.PathLike,
        *,
        on_error: Callable[[ImageError], None] | None = None,
        progress: Bar | None = None,
        wait: bool = False,
    ) -> Summary:
        """Bring the index up to date with the images under ``paths`` (files, folders, globs,
        ``.txt`` lists): new and changed files are embedded, moved ones keep their vector,
        deleted ones are dropped. Unreadable files are reported (``on_error``) and skipped; they
        are tried again on the next run. Another process updating the same index is an
        :class:`~mlx_aim.errors.OutputError` naming it (``wait=True``: wait for it)."""
        report = on_error or (lambda error: None)
        sources = paths if isinstance(paths, (list, tuple)) else [paths]
        files, errors = find_images([os.path.abspath(os.path.expanduser(s)) for s in sources])
        for error in errors:
            report(error)
        summary = Summary(failed=len(errors))
        lock = WriterLock(self.db).acquire(wait=wait)
        store = None
        try:
            store = Store(self.db, create=True)
            encoder = self.encoder(store)
            if store.identity is None:
                identity = encoder.identity
                width = identity["dim"] if "dim" in identity else encoder.width()
                store.claim({**identity, "dim": width}, self.vectors)
            plan = plan_update(files, store.entries())
            for error in plan.errors:
                report(error)
            summary.failed += len(plan.errors)
            self._apply(store, plan, summary)
            self._embed(store, encoder, plan, summary, report, progress)
            summary.total = store.count()
        finally:
            self._loaded = None
            if store is not None:
                store.close()
            lock.release()
        return summary

    @staticmethod
    def _apply(store: Store, plan: Plan, summary: Summary) -> None:
        """Moves, copies, refreshed stats and removals, in one transaction."""
        with store.transaction() as db:
            for old, new, entry in plan.moves:
                db.execute(
                    "UPDATE files SET path = ?, size = ?, mtime_ns = ? WHERE path = ?",
                    (new, entry.size, entry.mtime_ns, old),
                )
            for source, new, entry in plan.copies:
                db.execute(
                    "INSERT OR REPLACE INTO files SELECT ?, ?, ?, hash, vector FROM files "
                    "WHERE path = ?",
                    (new, entry.size, entry.mtime_ns, source),
                )
            db.executemany(
                "UPDATE files SET size = ?, mtime_ns = ? WHERE path = ?",
                [(e.size, e.mtime_ns, p) for p, e in plan.refresh],
            )
            db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in plan.removed])
        copied_new = sum(1 for _, new, _ in plan.copies if new not in plan.changed)
        summary.moved = len(plan.moves)
        summary.added += copied_new
        summary.updated += len(plan.copies) - copied_new
        summary.removed = len(plan.removed)
        summary.unchanged = plan.unchanged

    @staticmethod
    def _embed(
        store: Store,
        encoder: Encoder,
        plan: Plan,
        summary: Summary,
        report: Callable[[ImageError], None],
        progress: Bar | None,
    ) -> None:
        """Embed ``plan.embed``, committing each batch in its own transaction."""
        if not plan.embed:
            return
        advance = progress("indexing", len(plan.embed)) if progress is not None else None
        opener = HashingOpener()
        failed: list[bytes] = []

        def skip(error: ImageError) -> None:
            summary.failed += 1
            key = os.fsencode(str(error.path))
            if key in plan.changed:
                failed.append(key)  # its old vector no longer matches the file
            report(error)
            if advance is not None:
                advance(1)

        for paths, vectors in encoder.stream(plan.embed, skip, opener):
            rows = []
            for path, vector in zip(paths, vectors, strict=True):
                key = os.fsencode(path)
                rows.append((key, opener.take(path), vector))
                if key in plan.changed:
                    summary.updated += 1
                else:
                    summary.added += 1
            with store.transaction() as db:  # one per batch: kill -9 loses at most this one
                store.put(db, rows)
            if advance is not None:
                advance(len(paths))
        if failed:
            with store.transaction() as db:
                db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in failed])

    # ---- searching ---------------------------------------------------------------------------

    def _vectors(self, store: Store) -> tuple[list[bytes], np.ndarray]:
        if self._loaded is None:
            self._loaded = store.vectors()
        return self._loaded

    def query_vector(self, query: Any, store: Store) -> np.ndarray:
        """The unit query vector of ``query``: words as the CLI takes them, image paths, or a
        vector."""
        if isinstance(query, np.ndarray):
            return combine(query.reshape(1, -1), [1.0])
        parts = [query] if isinstance(query, (str, os.PathLike)) else list(query)
        terms = parse_terms(parts)
        if store.identity is None:
            raise InputError(f"{self.db}: empty index; add images with mlx-aim index first")
        encoder = self.encoder(store)
        vectors = np.zeros((len(terms), int(store.identity["dim"])), np.float32)
        texts = [i for i, t in enumerate(terms) if t.text is not None]
        images = [i for i, t in enumerate(terms) if t.image is not None]
        if texts:
            vectors[texts] = encoder.texts([terms[i].text for i in texts])
        if images:
            vectors[images] = encoder.images([terms[i].image for i in images])
        return combine(vectors, [t.weight for t in terms])

    def search(
        self, query: Any, k: int = 10, *, within: str | os.PathLike | None = None
    ) -> list[Hit]:
        """The ``k`` files most similar to ``query``, best first. ``query``: a text, an image
        path, a list of terms (``["beach", "+sunset.jpg", "-people", "2:dog"]``, see
        :func:`~mlx_aim.index.query.parse_terms`) or a vector; ``within``: a folder."""
        if k < 1:
            raise InputError(f"k must be >= 1, not {k}")
        store = Store(self.db)
        try:
            q = self.query_vector(query, store)
            paths, matrix = self._vectors(store)
        finally:
            store.close()
        keep = _within(paths, within)
        values = scores(matrix, q)
        if keep is not None:
            values[~keep] = -np.inf
        best = top_k(values, min(k, len(paths) if keep is None else int(keep.sum())))
        return [Hit(os.fsdecode(paths[i]), float(values[i])) for i in best]

    def duplicates(
        self, threshold: float = DEFAULT_THRESHOLD, *, within: str | os.PathLike | None = None
    ) -> list[Pair]:
        """Pairs of near-identical images (cosine >= ``threshold``), most similar first."""
        if not -1.0 <= threshold <= 1.0:
            raise InputError(f"the threshold is a cosine in [-1, 1], not {threshold}")
        store = Store(self.db)
        try:
            paths, matrix = self._vectors(store)
        finally:
            store.close()
        keep = _within(paths, within)
        if keep is not None:
            index = np.flatnonzero(keep)
            paths, matrix = [paths[i] for i in index], matrix[index]
        pairs = sorted(similar_pairs(matrix, threshold), key=lambda p: (-p[2], p[0], p[1]))
        return [Pair(os.fsdecode(paths[i]), os.fsdecode(paths[j]), s) for i, j, s in pairs]

    def __len__(self) -> int:
        store = Store(self.db)
        try:
            return store.count()
        finally:
            store.close()


def _within(paths: list[bytes], folder: str | os.PathLike | None) -> np.ndarray | None:
    """A mask of the paths inside ``folder`` (None: all)."""
    if folder is None:
        return None
    prefix = os.fsencode(os.path.join(os.path.abspath(folder), ""))
    return np.fromiter((p.startswith(prefix) for p in paths), bool, len(paths))
