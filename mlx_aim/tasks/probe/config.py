"""Probe settings, data and results (the config of ``mlx-aim probe``)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn

from ...data.images import ImageError
from ...data.loader import LabeledImages, find_labeled_images, split_paths
from ...errors import InputError
from ...models.base import HEADS

CLASSES_FILE = "classes.json"
REPORT_FILE = "probe_report.json"
PREDICTIONS_FILE = "predictions.jsonl"
EVAL_REPORT_FILE = "eval_report.json"
DEFAULT_BATCH_SIZE = 128
SMALL_SET_BATCH_SIZE = 16

Items = list[tuple[Path, int]]


def _setting(default: Any, help: str, panel: str = "Optimisation") -> Any:
    return field(default=default, metadata={"help": help, "panel": panel})


@dataclass
class ProbeConfig:
    """Probe settings; each field is a flag of ``mlx-aim probe`` (``batch_size``: --batch-size).

    The defaults suit small datasets (the paper trains 100 epochs on ImageNet).
    """

    head: str = _setting(
        "attentive",
        "attentive (the head of the released AIMv1 models) or linear (token-mean baseline).",
        "Probe",
    )
    layers: str = _setting(
        "last",
        "Blocks whose outputs are averaged: last (the last 6), best (released AIMv1 only) or "
        "i,j,k (negative counts from the end).",
        "Probe",
    )
    epochs: int = _setting(20, "Training epochs.")
    batch_size: int | None = _setting(
        None,
        f"Images per step. Default: {DEFAULT_BATCH_SIZE}, or a tenth of the training images "
        f"(at least {SMALL_SET_BATCH_SIZE}) when that is smaller, so that a small set still gets "
        "10 steps an epoch.",
    )
    lr: float = _setting(1e-3, "Peak learning rate (AdamW).")
    min_lr: float = _setting(1e-5, "Learning rate at the end of the cosine decay.")
    weight_decay: float = _setting(0.05, "AdamW weight decay.")
    warmup_epochs: float = _setting(1.0, "Linear warm-up length in epochs.")
    grad_clip: float = _setting(
        3.0, "Clip the global gradient norm to this value (0: no clipping)."
    )
    seed: int = _setting(0, "Seed of the head's initialisation, the batches and --val-fraction.")
    augment: bool = _setting(
        False, "Random resized crops and flips; runs the trunk every step.", "Data"
    )
    val_fraction: float = _setting(
        0.2, "Held-out fraction when the data has no val/ folder.", "Data"
    )
    workers: int = _setting(2, "Image decoding threads.", "Data")
    cache: bool = _setting(True, "Cache the trunk's features on disk (float16).", "Data")
    cache_dir: str | None = _setting(
        None,
        "Feature cache (default: $MLX_AIM_CACHE/features or ~/.cache/mlx-aim/features).",
        "Data",
    )

    def validate(self) -> ProbeConfig:
        """Raise ``InputError`` naming the first invalid setting (by its flag); return ``self``."""
        if self.head not in HEADS:
            raise InputError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.epochs < 1:
            raise InputError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 2:
            raise InputError(
                f"--batch-size must be >= 2 (BatchNorm needs two images), got {self.batch_size}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        for name in ("min_lr", "weight_decay", "warmup_epochs", "grad_clip", "workers"):
            if not getattr(self, name) >= 0:
                raise InputError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise InputError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        return self

    @property
    def forward_batch_size(self) -> int:
        """Images per forward pass of the trunk (feature extraction, evaluation)."""
        return self.batch_size or DEFAULT_BATCH_SIZE

    def step_batch_size(self, num_train: int) -> int:
        """Images per training step for ``num_train`` training images."""
        if self.batch_size is None:
            small_set = max(SMALL_SET_BATCH_SIZE, num_train // 10)
            return min(DEFAULT_BATCH_SIZE, small_set, num_train)
        return min(self.batch_size, num_train)


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class Hooks:
    """Callbacks a front end (the CLI) passes in: log lines, unreadable files, progress bars."""

    log: Callable[[str], None] = lambda message: None
    on_error: Callable[[ImageError], None] | None = None
    progress: Callable[[str, int], Callable[[int], None]] = lambda desc, total: lambda n: None


@dataclass
class ProbeResult:
    """The trained classifier (trunk + head), its class names and the JSON report."""

    model: nn.Module
    classes: list[str]
    report: dict[str, Any]


def load_dataset(
    root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0
) -> LabeledImages:
    """Class folders with ``train/`` and ``val/`` splits, or one folder split by ``val_fraction``
    (``val`` is always a list)."""
    try:
        found = find_labeled_images(root)
    except ValueError as e:
        raise InputError(str(e)) from None
    train, val = found.train, found.val
    if val is None:
        train, val = split_paths(found.train, val_fraction, seed)
    return LabeledImages(train, val, found.classes, list(found.errors), str(root))


def check_classes(data: LabeledImages) -> None:
    """Refuse data with fewer than two classes (a probe could not learn anything from it)."""
    if len(data.classes) >= 2:
        return
    root = Path(data.root)
    found = f"one class folder ({data.classes[0]})" if data.classes else "no class folder"
    raise InputError(
        f"{root}: {found}, a probe needs two or more: {root}/<class>/<images>, or "
        f"{root}/train/<class>/<images> with {root}/val/<class>/<images> (images directly in "
        "the folder belong to no class)"
    )
