"""Datasets on disk and a deterministic, resumable, background image loader (numpy only).

Sample order, shards and augmentations depend only on ``seed`` and the loader's arguments, never
on thread timing:

- epoch ``e`` visits the items in the permutation ``P_e`` drawn from ``(seed, e)`` (or in input
  order when ``shuffle=False``);
- global step ``s`` of an epoch covers the ``G = world_size * batch_size`` consecutive entries
  ``P_e[s*G : (s+1)*G]``, and rank ``r`` takes its slice ``[s*G + r*B, s*G + (r+1)*B)``. So the
  union of the ranks' batches at one step is the single-process batch of size ``G``. Rank
  ``r``'s entries of the epoch (its "shard") are these slices in order, followed by its slice
  of the last ``n % G`` entries;
- with ``drop_last`` every rank yields ``n // G`` batches per epoch: a batch may start only
  within the rank's first ``(n // G) * B`` entries, and the last partial batch is dropped;
- a sample's augmentation RNG is drawn from ``(seed, e, item index)``;
- a file that cannot be decoded is reported once (``on_error``) and skipped; its rank fills the
  batch from the next entries of its own shard (with ``drop_last`` these include its share of
  the last ``n % G`` entries). Ranks then no longer cover exactly the single-process batch, but
  every run with the same arguments still yields the same batches.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageError, PathLike, find_images, open_image

log = logging.getLogger(__name__)

Transform = Callable[[Any, np.random.Generator], np.ndarray]

_PERMUTATION, _SAMPLE = 0, 1  # RNG domains, so that permutations and samples never share seeds


def split_paths(paths: Sequence, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Split items into (train, val) at random but deterministically; both keep input order.

    ``val`` gets ``round(len * val_fraction)`` items (at least one, and never all of them, when
    ``val_fraction > 0`` and there are two or more items).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    items = list(paths)
    n = len(items)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    train = [x for x, v in zip(items, is_val, strict=True) if not v]
    val = [x for x, v in zip(items, is_val, strict=True) if v]
    return train, val


@dataclass
class LabeledImages:
    """Image paths with integer labels indexing ``classes`` (sorted folder names).

    ``val`` is None when the folder has no validation split (``mlx_aim.tasks.probe.load_dataset``
    then splits ``train``); ``root`` is the folder the images were found in.
    """

    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]] | None
    classes: list[str]
    errors: list[ImageError] = field(default_factory=list)
    root: str = ""


def find_labeled_images(root: PathLike) -> LabeledImages:
    """Find a classification dataset laid out as class folders.

    Either ``root/<class>/...`` (no validation split) or ``root/train/<class>/...`` with an
    optional ``root/val/<class>/...`` (or ``validation``). Classes are the sorted training folder
    names; validation classes must be a subset. Images may be nested inside class folders.

    Raises:
        ValueError: no class folders, an empty training class, or an unknown validation class.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    train_dir, val_dir = root, None
    if (root / "train").is_dir():
        train_dir = root / "train"
        val_dir = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    classes = _subfolders(train_dir)
    if not classes:
        raise ValueError(f"{train_dir}: no class folders (expected {train_dir}/<class>/<images>)")
    errors: list[ImageError] = []
    train = _labeled(train_dir, classes, classes, errors)
    empty = sorted(set(range(len(classes))) - {label for _, label in train})
    if empty:
        raise ValueError(f"{train_dir / classes[empty[0]]}: class folder contains no images")
    val = None
    if val_dir is not None:
        val_classes = _subfolders(val_dir)
        unknown = [c for c in val_classes if c not in classes]
        if unknown:
            raise ValueError(
                f"{val_dir / unknown[0]}: validation class {unknown[0]!r} has no training folder "
                f"in {train_dir}"
            )
        val = _labeled(val_dir, val_classes, classes, errors)
    return LabeledImages(train, val, classes, errors, str(root))


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _labeled(folder: Path, names: list[str], classes: list[str], errors: list) -> list:
    items = []
    for name in names:
        paths, errs = find_images(folder / name)
        errors.extend(errs)
        label = classes.index(name)
        items.extend((p, label) for p in paths)
    return items


class ImageLoader:
    """Decode and transform images in background threads; iterate over batches.

    Each batch is ``{"images": float32 (B, H, W, C), "paths": [Path], "indices": int64 (B,)}``
    plus ``"labels": int32 (B,)`` when items are ``(path, label)`` pairs or ``labels`` is given
    (``labels`` may also hold a row per item, e.g. token ids: then (B, ...)).
    ``transform(img, rng)`` receives an RGB ``PIL.Image`` and a ``numpy.random.Generator``
    (``Preprocessing`` and the other deterministic transforms ignore ``rng``).

    ``epochs`` is the total number of epochs (counted from 0, also when resuming); ``None``
    iterates forever (training). For evaluation use ``shuffle=False, drop_last=False,
    epochs=1``: one pass in input order with a short last batch. ``num_workers`` threads decode
    (0: in the iterating thread), at most ``prefetch`` batches ahead of the consumer.
    ``on_error(ImageError)`` is called once per unreadable path (default: a logging warning).
    ``opener(path)`` decodes an item (default ``open_image``; e.g. a reader of tar members).

    Every ``iter(loader)`` starts again from ``start``; ``state()`` is the position after the
    last batch yielded, and ``ImageLoader(..., start=state)`` continues exactly from there. The
    cursor counts this rank's entries; without unreadable files it is the same on every rank, so
    rank 0's state can restore all ranks.
    """

    def __init__(
        self,
        items: Sequence,
        transform: Transform,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        prefetch: int = 4,
        on_error: Callable[[ImageError], None] | None = None,
        labels: Sequence[int] | None = None,
        epochs: int | None = None,
        start: dict | None = None,
        opener: Callable[[Path], Any] = open_image,
    ):
        paths, pair_labels = _unpack(items)
        if labels is not None and pair_labels is not None:
            raise ValueError("give labels either as (path, label) items or as labels=, not both")
        labels = pair_labels if labels is None else list(labels)
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} items")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid batch_size={batch_size} rank={rank} world={world_size}")
        if num_workers < 0 or prefetch < 1 or (epochs is not None and epochs < 0) or seed < 0:
            raise ValueError("need num_workers >= 0, prefetch >= 1, epochs >= 0 and seed >= 0")
        if not paths:
            raise ValueError("no images to load")
        self.paths = [Path(p) for p in paths]
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int32)
        self.transform = transform
        self.opener = opener
        self.batch_size, self.seed, self.epochs = batch_size, seed, epochs
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch = num_workers, prefetch
        self.on_error = on_error or _log_error
        global_batch = batch_size * world_size
        if drop_last and len(self.paths) < global_batch:
            raise ValueError(
                f"{len(self.paths)} images are fewer than one batch of {global_batch} "
                f"({world_size} x {batch_size}); use a smaller batch size or drop_last=False"
            )
        self._start = self._check_start(start)
        self._state = self._make_state(self._start["epoch"], self._start["cursor"])
        self._reported: set[str] = set(self._start.get("bad", []))
        self._bad: dict[Path, ImageError] = {}

    # ---- order -------------------------------------------------------------------------

    def shard(self, epoch: int) -> np.ndarray:
        """Item indices this rank visits in ``epoch``, in order (see the module docstring)."""
        n, b = len(self.paths), self.batch_size
        if self.shuffle:
            order = np.random.default_rng([self.seed, _PERMUTATION, epoch]).permutation(n)
        else:
            order = np.arange(n)
        return order[(np.arange(n) // b) % self.world_size == self.rank]

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in a full epoch when every file is readable."""
        n, b, w = len(self.paths), self.batch_size, self.world_size
        if self.drop_last:
            return n // (b * w)
        return len(range(self.rank, math.ceil(n / b), w))

    def _last_start(self) -> int:
        """With ``drop_last``, no batch starts at or after this shard position."""
        return self.batches_per_epoch * self.batch_size if self.drop_last else len(self.paths)

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless loader (epochs=None) has no length")
        epoch, cursor = self._start["epoch"], self._start["cursor"]
        if epoch >= self.epochs:
            return 0
        if self.drop_last:
            first = max(self.batches_per_epoch - math.ceil(cursor / self.batch_size), 0)
        else:
            first = math.ceil(max(len(self.shard(epoch)) - cursor, 0) / self.batch_size)
        return first + (self.epochs - epoch - 1) * self.batches_per_epoch

    def _entries(self) -> Iterator[tuple[int, int, int]]:
        """(epoch, cursor, item index) in visiting order; index -1 marks the end of an epoch."""
        epoch, cursor = self._start["epoch"], self._start["cursor"]
        while self.epochs is None or epoch < self.epochs:
            shard = self.shard(epoch)
            for j in range(cursor, len(shard)):
                yield epoch, j, int(shard[j])
            yield epoch, len(shard), -1
            epoch, cursor = epoch + 1, 0

    # ---- loading -----------------------------------------------------------------------

    def _load(self, epoch: int, index: int) -> np.ndarray | ImageError:
        path = self.paths[index]
        if path in self._bad:
            return self._bad[path]
        try:
            img = self.opener(path)
        except ImageError as e:
            self._bad[path] = e
            return e
        rng = np.random.default_rng([self.seed, _SAMPLE, epoch, index])
        return self.transform(img, rng)

    def __iter__(self) -> Iterator[dict]:
        pool = None
        if self.num_workers:
            pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="mlx-aim-loader")
        window: deque = deque()
        capacity = max(self.prefetch * self.batch_size, self.num_workers) if pool else 1
        entries = self._entries()
        self._state = self._make_state(self._start["epoch"], self._start["cursor"])
        batch: list[tuple[int, np.ndarray]] = []
        batch_start = self._start["cursor"]  # shard position after the previous batch
        full_epoch = batch_start == 0
        good = batches = 0
        try:
            while True:
                while len(window) < capacity and (entry := next(entries, None)) is not None:
                    epoch, _, index = entry
                    if index < 0:
                        window.append((entry, None))
                    elif pool is None:
                        window.append((entry, self._load(epoch, index)))
                    else:
                        window.append((entry, pool.submit(self._load, epoch, index)))
                if not window:
                    return
                (epoch, cursor, index), pending = window.popleft()
                if index < 0:  # end of epoch
                    if batch and not self.drop_last:
                        yield self._collate(batch, epoch, cursor)
                        batches += 1
                    if full_epoch and cursor > 0 and batches == 0:
                        raise ValueError(self._no_batch_reason(epoch, cursor, good))
                    batch, batch_start, full_epoch, good, batches = [], 0, True, 0, 0
                    continue
                if batch_start >= self._last_start():  # drop_last: the epoch's batches are done
                    if isinstance(pending, Future):
                        pending.cancel()
                    continue
                result = pending.result() if isinstance(pending, Future) else pending
                if isinstance(result, ImageError):
                    self._report(result)
                    continue
                good += 1
                batch.append((index, result))
                if len(batch) == self.batch_size:
                    yield self._collate(batch, epoch, cursor + 1)
                    batch, batch_start, batches = [], cursor + 1, batches + 1
        finally:
            for _, pending in window:
                if isinstance(pending, Future):
                    pending.cancel()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _collate(self, batch: list, epoch: int, cursor: int) -> dict:
        self._state = self._make_state(epoch, cursor)
        indices = np.array([i for i, _ in batch], dtype=np.int64)
        shapes = {a.shape for _, a in batch}
        if len(shapes) > 1:
            raise ValueError(
                f"the transform returned arrays of different shapes {sorted(shapes)} in one "
                "batch; use batch_size=1 or a fixed-size transform"
            )
        out = {
            "images": np.stack([a for _, a in batch]).astype(np.float32, copy=False),
            "paths": [self.paths[i] for i in indices],
            "indices": indices,
        }
        if self.labels is not None:
            out["labels"] = self.labels[indices]
        return out

    def _report(self, error: ImageError) -> None:
        key = str(error.path)
        if key not in self._reported:
            self._reported.add(key)
            self.on_error(error)

    def _no_batch_reason(self, epoch: int, seen: int, good: int) -> str:
        if good == 0:
            return f"none of the {seen} images of epoch {epoch} could be read (see errors above)"
        return (
            f"only {good} of the {seen} images of epoch {epoch} could be read: not enough for one "
            f"batch of {self.batch_size} with drop_last"
        )

    # ---- resuming ----------------------------------------------------------------------

    @classmethod
    def in_order(
        cls,
        items: Sequence,
        transform: Callable,
        batch_size: int,
        *,
        num_workers: int = 2,
        on_error: Callable[[ImageError], None] | None = None,
    ) -> ImageLoader:
        """One pass over ``items`` in their order, last batch kept (evaluation, embedding)."""
        return cls(
            list(items),
            transform,
            batch_size,
            shuffle=False,
            drop_last=False,
            epochs=1,
            num_workers=num_workers,
            on_error=on_error,
        )

    def state(self) -> dict:
        """JSON-serialisable position after the last batch yielded (for ``start=``)."""
        return {**self._state, "bad": sorted(self._reported)}

    def _make_state(self, epoch: int, cursor: int) -> dict:
        return {
            "epoch": epoch,
            "cursor": cursor,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_items": len(self.paths),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def _check_start(self, start: dict | None) -> dict:
        if start is None:
            return {"epoch": 0, "cursor": 0}
        expected = self._make_state(start["epoch"], start["cursor"])
        for key, value in expected.items():
            if key in start and start[key] != value:
                raise ValueError(
                    f"cannot resume: the saved loader state has {key}={start[key]!r}, "
                    f"this loader has {key}={value!r}"
                )
        return dict(start)


def _unpack(items: Sequence) -> tuple[list, list | None]:
    items = list(items)
    if items and isinstance(items[0], (tuple, list)):
        if not all(isinstance(x, (tuple, list)) and len(x) == 2 for x in items):
            raise ValueError("items must be all paths or all (path, label) pairs")
        return [p for p, _ in items], [int(label) for _, label in items]
    return items, None


def _log_error(error: ImageError) -> None:
    log.warning("skipping %s", error)


def measure_throughput(loader: ImageLoader, n_batches: int, warmup: int = 1) -> float:
    """Images per second over ``n_batches`` batches, timed after ``warmup`` untimed batches."""
    batches = iter(loader)
    try:
        for _ in range(warmup):
            next(batches)
        start, images = time.perf_counter(), 0
        for _ in range(n_batches):
            images += len(next(batches)["images"])
        return images / (time.perf_counter() - start)
    except StopIteration:
        raise ValueError(f"the loader yielded fewer than {warmup + n_batches} batches") from None
    finally:
        batches.close()
