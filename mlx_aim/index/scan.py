"""What an ``index`` run must do: the files found compared with the rows of the database.

A file whose path, size and modification time match its row is unchanged (no read). A new or
changed file whose size matches a known row is hashed first: same content as a row means its
vector is reused (a moved file takes over the row; a copy gets its own) and nothing is embedded.
Every other new or changed file is embedded, hashed from the very bytes that are decoded
(:class:`HashingOpener`), so an image rewritten while it is indexed is stored with the hash and
stat of the version embedded, and picked up again by the next run.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..data.images import ImageError, decode_image, read_image_bytes
from .store import Entry

HASH_BYTES = 16
_HASH_BLOCK = 1 << 20


def content_hash(data: bytes) -> bytes:
    """The content hash of a file's bytes (BLAKE2b, 128 bits)."""
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


def file_hash(path: str | os.PathLike) -> bytes:
    """:func:`content_hash` of a file, read in blocks."""
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.digest()


@dataclass
class Plan:
    """The work of one run: files to embed, rows to move, copy, refresh or delete."""

    embed: list[str] = field(default_factory=list)
    changed: set[bytes] = field(default_factory=set)  # indexed paths whose content changed
    moves: list[tuple[bytes, bytes, Entry]] = field(default_factory=list)  # old, new, new entry
    copies: list[tuple[bytes, bytes, Entry]] = field(default_factory=list)  # source, new, entry
    refresh: list[tuple[bytes, Entry]] = field(default_factory=list)  # same content, new stat
    removed: list[bytes] = field(default_factory=list)
    unchanged: int = 0
    errors: list[ImageError] = field(default_factory=list)


def stat_entry(st: os.stat_result, hash_: bytes = b"") -> Entry:
    """The entry of a file with this stat and hash."""
    return Entry(st.st_size, st.st_mtime_ns, hash_)


def plan_update(files: Sequence[Path], known: dict[bytes, Entry]) -> Plan:
    """Compare the files found with the indexed rows ``known`` (path bytes -> entry)."""
    plan = Plan()
    found: dict[bytes, tuple[str, os.stat_result]] = {}
    for file in files:
        path = os.fspath(file)
        if not os.path.isabs(path) or "/." in path:
            path = os.path.abspath(path)  # normalised ("a/../b", "./b")
        try:
            st = os.stat(path)
        except OSError as e:
            plan.errors.append(ImageError(path, f"cannot read file ({e.strerror or e})"))
            continue
        found[os.fsencode(path)] = (path, st)
    gone = {p: e for p, e in known.items() if p not in found and not _exists(p)}
    sizes = {e.size for e in known.values()}
    by_hash: dict[bytes, bytes] = {}
    for key, entry in known.items():
        if key not in gone:
            by_hash.setdefault(entry.hash, key)
    moved_from = {e.hash: p for p, e in gone.items()}  # a moved file takes over its old row
    for key, (path, st) in found.items():
        old = known.get(key)
        if old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns):
            plan.unchanged += 1
            continue
        hash_ = _hash_if(path, st.st_size in sizes, plan.errors)
        if hash_ is None:
            continue
        entry = stat_entry(st, hash_)
        if old is not None and hash_ == old.hash:
            plan.refresh.append((key, entry))  # touched, same content
            plan.unchanged += 1
        elif old is None and hash_ in moved_from:
            plan.moves.append((moved_from.pop(hash_), key, entry))
        elif hash_ in by_hash:  # a copy of an indexed file
            plan.copies.append((by_hash[hash_], key, entry))
        else:
            plan.embed.append(path)
        if old is not None and hash_ != old.hash:
            plan.changed.add(key)
    moved = {old for old, _, _ in plan.moves}
    plan.removed = [p for p in gone if p not in moved]
    return plan


def _exists(path: bytes) -> bool:
    return os.path.isfile(path)


def _hash_if(path: str, wanted: bool, errors: list[ImageError]) -> bytes | None:
    """The file's hash when it may match a row (``wanted``), else ``b""``; None if unreadable."""
    if not wanted:
        return b""
    try:
        return file_hash(path)
    except OSError as e:
        errors.append(ImageError(path, f"cannot read file ({e.strerror or e})"))
        return None


class HashingOpener:
    """An image opener for the loader that records each file's stat and content hash.

    The bytes are read once: hashed and decoded from the same buffer, so the stored hash is the
    hash of the pixels embedded. A file whose size or mtime changes while it is read is refused
    (it is still being written) and retried on the next run.
    """

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> Image.Image:
        try:
            before = os.stat(path)
        except OSError as e:
            raise ImageError(path, f"cannot read file ({e.strerror or e})") from None
        data = read_image_bytes(path)  # a regular file of at most MAX_IMAGE_BYTES
        after = os.stat(path)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise ImageError(path, "changed while it was read; it will be retried on the next run")
        image = decode_image(data, path)
        with self._lock:
            self.entries[str(path)] = stat_entry(after, content_hash(data))
        return image

    def take(self, path: str) -> Entry:
        """The entry recorded for ``path`` (forgotten afterwards)."""
        with self._lock:
            return self.entries.pop(path)
