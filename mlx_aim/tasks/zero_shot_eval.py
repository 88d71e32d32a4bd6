"""Zero-shot accuracy on labelled folders (the library side of ``mlx-aim zero-shot --eval``).

Example::

    import mlx_aim
    from mlx_aim.tasks.zero_shot import evaluate

    result = evaluate(mlx_aim.load("runs/scenes-lit"), "shapes/")  # shapes/<class>/<images>
    result.top1, result.top5, result.per_class, result.confused

``DIR`` holds one folder per class; the folder name is the label (``_`` reads as a space) unless
``prompts`` maps it to another label text. Each image is classified among all the labels as
``ZeroShotClassifier`` does (prompt templates averaged per label); ``top5`` is reported only with
more than 5 classes, as a top-5 among 5 or fewer labels is always 1.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.nn as nn
import numpy as np

from ..data.images import ImageError, find_images
from ..errors import InputError
from ..io import read_text
from .config import TEMPLATE


@dataclass
class ZeroShotEvaluation:
    """Accuracies of a zero-shot evaluation (fractions in [0, 1])."""

    top1: float
    top5: float | None  # None with 5 classes or fewer
    per_class: dict[str, float]  # folder name -> top-1 of its images
    confused: list[tuple[str, str, int]]  # (true folder, predicted folder, images), most first
    labels: dict[str, str]  # folder name -> the label text its prompts use
    images: int
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """``top1``, ``top5``, ``per_class`` and the rest, JSON-ready."""
        out = asdict(self)
        out["confused"] = [list(c) for c in self.confused]
        return out


def class_folders(root: str | os.PathLike) -> list[Path]:
    """The class folders of ``root`` (its non-hidden subfolders), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder (expected {root}/<class>/<images>)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise InputError(f"{root}: zero-shot evaluation needs at least 2 class folders")
    return folders


def read_label_map(path: str | os.PathLike) -> dict[str, str]:
    """A ``folder: label text`` mapping, one a line (blank lines and ``#`` comments skipped)."""
    mapping: dict[str, str] = {}
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        folder, sep, label = line.partition(":")
        if not sep or not folder.strip() or not label.strip():
            raise InputError(f"{path}:{number}: expected 'folder: label text', got {line!r}")
        mapping[folder.strip()] = label.strip()
    return mapping


def folder_label(name: str, prompts: Mapping[str, str] | None = None) -> str:
    """The label text of a class folder: ``prompts[name]``, else the name with ``_`` as spaces."""
    if prompts and name in prompts:
        return prompts[name]
    return " ".join(name.replace("_", " ").split())


def scores(
    probs: np.ndarray, truth: np.ndarray, names: Sequence[str], top_confused: int = 10
) -> tuple[float, float | None, dict[str, float], list[tuple[str, str, int]]]:
    """top-1, top-5 (None with <= 5 classes), per-class top-1 and the most confused pairs of
    probabilities (N, C) against true class indices (N,)."""
    from .probe.evaluation import topk_accuracy

    top1, top5 = topk_accuracy(probs, truth)
    predicted = np.argmax(probs, axis=1)  # the first of equal maxima, as topk_accuracy's order
    hit1 = predicted == truth
    per_class = {
        name: float(hit1[truth == c].mean()) for c, name in enumerate(names) if (truth == c).any()
    }
    pairs = Counter((names[t], names[p]) for t, p in zip(truth, predicted, strict=True) if t != p)
    confused = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top_confused]
    return top1, top5 if len(names) > 5 else None, per_class, [(t, p, n) for (t, p), n in confused]


def evaluate(
    model: nn.Module,
    root: str | os.PathLike,
    templates: Sequence[str] = (TEMPLATE,),
    *,
    prompts: Mapping[str, str] | None = None,
    batch_size: int = 16,
    num_workers: int = 2,
    on_error: Callable[[ImageError], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ZeroShotEvaluation:
    """Zero-shot accuracy of a LiT ``model`` on the class folders of ``root`` (see the module
    docstring); unreadable images are skipped (``on_error``) and listed in ``skipped``."""
    from .zero_shot import ZeroShotClassifier, check_labels

    folders = class_folders(root)
    names = [f.name for f in folders]
    paths: list[Path] = []
    truth: list[int] = []
    skipped: list[str] = []
    for c, folder in enumerate(folders):
        found, errors = find_images(folder)
        paths += found
        truth += [c] * len(found)
        skipped += [str(e) for e in errors]
    if not paths:
        raise InputError(f"{root}: no images in the class folders")
    labels = {name: folder_label(name, prompts) for name in names}
    try:
        check_labels(list(labels.values()))
    except ValueError as e:
        raise InputError(f"{root}: {e}") from None
    try:  # a bad template or a tokenizer that does not fit the model: named by the message
        classifier = ZeroShotClassifier(
            model, list(labels.values()), templates, batch_size=batch_size
        )
    except ValueError as e:
        raise InputError(str(e)) from None

    def skip(error: ImageError) -> None:
        skipped.append(str(error))
        if on_error is not None:
            on_error(error)

    probs, result = classifier.classify_files(
        paths, on_error=skip, progress=progress, num_workers=num_workers
    )
    if not result.paths:
        raise InputError(f"{root}: none of the images could be read")
    index = {str(p): t for p, t in zip(paths, truth, strict=True)}
    kept = np.array([index[str(p)] for p in result.paths])
    top1, top5, per_class, confused = scores(probs, kept, names)
    return ZeroShotEvaluation(top1, top5, per_class, confused, labels, len(kept), skipped)
