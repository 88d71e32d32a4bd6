"""Queries and exact nearest-neighbour search over the index's unit vectors (numpy).

A query is one or more terms, combined as rclip combines them: each term is a text or an image
path, with an optional sign (``+`` adds, ``-`` subtracts) and weight (``2:golden retriever``).
The query vector is the weighted sum of the terms' unit embeddings, renormalised; scores are
cosine similarities. Search is exact: the stored matrix is scanned in chunks converted to float32
(the accumulation type), and the top k found with a partial sort.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import is_image_file
from ..errors import InputError
from ..io import check_regular_file

CHUNK_ROWS = 32768  # rows converted to float32 at a time (32768 x 1024 x 4 bytes = 128 MiB)
_WEIGHT = re.compile(r"^([0-9]*\.?[0-9]+):(.+)$", re.S)


@dataclass(frozen=True)
class Term:
    """One part of a query: a text or an image file, with its signed weight."""

    weight: float
    text: str | None = None
    image: Path | None = None

    def __str__(self) -> str:
        return f"{self.weight:+g}:{self.image if self.image is not None else self.text}"


def parse_terms(parts: Sequence[str | os.PathLike]) -> list[Term]:
    """The terms of a query given as command-line words.

    ``+`` or ``-`` alone sets the sign of the next word; a word may also start with its sign
    (``-people``, ``+./sunset.jpg``) and a weight (``2:golden retriever``, ``-0.5:night``). A
    word naming an existing file is an image (``os.PathLike`` items always are); any other word is
    a text (a folder's bare name too), except one that looks like a missing image file
    (``cat.jpg``) or a folder's path (``photos/``), which are errors.
    """
    terms: list[Term] = []
    sign = 1.0
    for part in parts:
        if isinstance(part, os.PathLike):
            terms.append(Term(sign, image=_image(Path(part))))
            sign = 1.0
            continue
        if part in ("+", "-"):
            sign = -1.0 if part == "-" else 1.0
            continue
        word, weight = part, 1.0
        if word[:1] in ("+", "-") and not os.path.exists(word):
            sign, word = (-1.0 if word[0] == "-" else 1.0) * sign, word[1:]
        match = _WEIGHT.match(word)
        if match and not os.path.exists(word):
            weight, word = float(match.group(1)), match.group(2)
        if not word.strip():
            raise InputError(f"empty query term in {part!r}")
        if os.sep in word and os.path.isdir(word):
            raise InputError(f"{word}: a folder, not an image; give an image file as the query")
        if os.path.isfile(word) or (is_image_file(word) and not any(c.isspace() for c in word)):
            terms.append(Term(sign * weight, image=_image(Path(word))))
        else:
            terms.append(Term(sign * weight, text=word))
        sign = 1.0
    if not terms:
        raise InputError("give a query: a text or an image path")
    if not any(t.weight > 0 for t in terms):
        raise InputError("a query needs at least one positive term (not only -terms)")
    return terms


def _image(path: Path) -> Path:
    if not path.is_file():
        if os.path.lexists(path):
            check_regular_file(path)  # a FIFO, a device, a dangling link: named as such
        raise InputError(f"{path}: query image not found")
    return path


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The unit query vector: the weighted sum of the terms' unit vectors, renormalised."""
    vectors = np.asarray(vectors, np.float32)
    units = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    total = (np.asarray(weights, np.float32)[:, None] * units).sum(0)
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise InputError("the query's terms cancel out; change their weights")
    return total / norm


def scores(matrix: np.ndarray, query: np.ndarray, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """Cosine scores (N,) float32 of unit rows ``matrix`` (float16 or float32) against ``query``."""
    query = np.asarray(query, np.float32)
    out = np.empty(len(matrix), np.float32)
    for start in range(0, len(matrix), chunk):
        block = matrix[start : start + chunk]
        np.matmul(block.astype(np.float32, copy=False), query, out=out[start : start + len(block)])
    return out


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, largest first (ties in index order)."""
    k = min(k, len(values))
    if k <= 0:
        return np.zeros((0,), np.int64)
    part = np.argpartition(-values, k - 1)[:k] if k < len(values) else np.arange(len(values))
    return part[np.lexsort((part, -values[part]))]


def similar_pairs(
    matrix: np.ndarray, threshold: float, chunk: int = 2048
) -> Iterator[tuple[int, int, float]]:
    """Every pair ``(i, j, cosine)`` with ``i < j`` and cosine >= ``threshold`` (exact; blocks of
    ``chunk`` x ``chunk`` scores, the upper triangle only)."""
    for top in range(0, len(matrix), chunk):
        rows = matrix[top : top + chunk].astype(np.float32, copy=False)
        for left in range(top, len(matrix), chunk):
            cols = matrix[left : left + chunk].astype(np.float32, copy=False)
            block = rows @ cols.T
            for r, c in zip(*np.nonzero(block >= threshold), strict=True):
                i, j = top + int(r), left + int(c)
                if j > i:
                    yield i, j, float(block[r, c])
