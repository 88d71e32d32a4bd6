"""What a run trains: the pre-training model config and the training and validation images."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import io
from ..checkpoints.registry import REGISTRY, Preprocessing, default_preprocessing, pretrain_config
from ..data.builtin import is_builtin_name, resolve_builtin, training_splits
from ..data.images import ImageError, find_images
from ..data.loader import split_paths
from ..errors import InputError
from ..models import build_model_args
from ..models.base import ConfigError
from .config import TrainConfig
from .distributed import World

_SUBSET_SEED = 7


def resolve_model(config: TrainConfig) -> tuple[dict[str, Any], Preprocessing]:
    """The ``aim_pretrain`` model config and the preprocessing of ``--model`` and head flags."""
    head = {
        k: v
        for k, v in (("head_blocks", config.head_blocks), ("head_width", config.head_width))
        if v is not None
    }
    source = Path(config.model).expanduser()
    try:
        if config.model in REGISTRY:
            model_config = pretrain_config(config.model, **head)
            preprocessing = REGISTRY[config.model].preprocessing
        elif source.is_dir():
            raise InputError(
                f"--model {config.model}: a directory; give its config.json to train that "
                "architecture from scratch"
            )
        elif source.is_file():
            raw = _read_json(source)
            if raw.get("model_type") == "aim_pretrain":
                model_config = {**raw, **head}
            else:
                model_config = {"model_type": "aim_pretrain", "encoder": raw, **head}
            preprocessing = default_preprocessing(model_config)
        else:
            known = ", ".join(n for n, e in REGISTRY.items() if e.checkpoint is None)
            raise InputError(
                f"--model {config.model}: not a model name (e.g. {known}; see `mlx-aim models`) "
                "and no such JSON config file"
            )
        build_model_args(model_config)
    except ConfigError as e:
        raise InputError(f"--model {config.model}: {e}") from None
    if build_model_args(model_config).encoder_args.num_patches < 2:
        raise InputError(f"--model {config.model}: next-patch prediction needs >= 2 patches")
    return model_config, preprocessing


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = io.read_json(path, max_bytes=2**20)
    except InputError as e:
        raise InputError(f"--model {e}") from None
    if not isinstance(value, dict):
        raise InputError(f"--model {path}: a model config must be a JSON object")
    return value


@dataclass
class Images:
    train: list[Path]
    val: list[Path]
    description: str
    errors: list[ImageError]


def find_training_images(config: TrainConfig) -> Images:
    """Training and validation image paths (not decoded) and the files that were skipped."""
    errors: list[ImageError] = []
    if config.data is None or is_builtin_name(config.data):
        name = str(config.data or "digits")
        train_root, val_root = training_splits(name)
        train = _find(train_root, "--data", errors)
        val_source = resolve_builtin(config.val_data) if config.val_data else val_root
        description = f"built-in {name} ({train_root})"
    else:
        train = _find(resolve_builtin(config.data), "--data", errors)
        val_source = resolve_builtin(config.val_data) if config.val_data else None
        description = str(config.data)
    if val_source is not None:
        val = _find(val_source, "--val-data", errors)
    elif config.val_fraction > 0:
        train, val = split_paths(train, config.val_fraction, config.seed)
    else:
        val = []
    return Images(train, val, description, errors)


def _find(source, flag: str, errors: list[ImageError]) -> list[Path]:
    paths, problems = find_images(source)
    if not paths:
        reason = (
            problems[0].reason if problems else "no image files (JPEG, PNG, WebP, BMP, TIFF, GIF)"
        )
        raise InputError(f"{flag} {source}: {reason}")
    errors.extend(problems)
    return paths


def fixed_subset(items: list[Path], n: int, seed: int) -> list[Path]:
    """A deterministic random subset of ``n`` items, in input order."""
    if len(items) <= n:
        return list(items)
    keep = np.sort(np.random.default_rng([seed, _SUBSET_SEED]).permutation(len(items))[:n])
    return [items[i] for i in keep]


class SkippedFiles:
    """The unreadable files of a run: all counted, each named once per output directory.

    ``reported`` holds the files a run already named (restored from its checkpoint), so a
    resumed run does not name them again. Rank 0 logs; the other ranks print with their rank.
    """

    def __init__(self, log: Callable[[str], None], world: World):
        self.log = log
        self.world = world
        self.paths: set[str] = set()
        self.reported: set[str] = set()

    def restore(self, paths: Iterable[str]) -> None:
        """Count ``paths`` as skipped and already named."""
        self.paths.update(paths)
        self.reported.update(self.paths)

    def __call__(self, error: ImageError) -> None:
        path = str(error.path)
        self.paths.add(path)
        if path in self.reported:
            return
        self.reported.add(path)
        if self.world.is_main:
            self.log(f"skipping {error}")  # an unreadable image or its caption
        else:
            print(f"[rank {self.world.rank}] skipping {error}", flush=True)


def evaluation_preprocess(preprocessing: Preprocessing, encoder: Any) -> Preprocessing:
    """The model's evaluation preprocessing, at the size the pre-training model takes."""
    if preprocessing.crop != encoder.image_size or preprocessing.native:
        size = encoder.image_size
        return Preprocessing(size, size, preprocessing.mean, preprocessing.std)
    return Preprocessing(
        preprocessing.resize, preprocessing.crop, preprocessing.mean, preprocessing.std
    )
