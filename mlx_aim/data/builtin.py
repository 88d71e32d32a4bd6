"""Built-in datasets, materialised once as PNG class folders (numpy + Pillow only).

``scenes``: generated captioned shapes (``scenes.py``) with labelled folders for probing.

``digits``: the UCI ML handwritten digits (E. Alpaydin, C. Kaynak, "Optical Recognition of
Handwritten Digits", UCI Machine Learning Repository, 1998; CC BY 4.0), the 1797 8x8 images of
scikit-learn's ``load_digits``, shipped as ``assets/digits.npz`` (``images`` uint8 0..16,
``labels`` uint8, ``val`` bool: a fixed split of 297 validation images stratified by class).

They are written as 32x32 RGB PNGs, upscaled with bicubic interpolation: 32 px gives 8x8 patches
of 4 px or 4x4 patches of 8 px, and bicubic (unlike nearest) leaves texture inside each patch, so
per-patch-normalised pixel targets are not trivially flat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..env import cache_root
from ..errors import InputError
from ..io import atomic_directory, read_json, write_json
from .images import PathLike
from .scenes import write_scenes

DATASETS = ("digits", "scenes")
DIGITS_SIZE = 32
_ASSETS = Path(__file__).parents[1] / "assets"
_FORMAT_VERSION = 1


def cache_dir() -> Path:
    """Where built-in datasets live: ``$MLX_AIM_CACHE/datasets`` or ``~/.cache/mlx-aim/datasets``."""
    return cache_root() / "datasets"


def builtin_dataset(name: str = "digits", root: PathLike | None = None) -> Path:
    """Return the folder of a built-in dataset, writing it first if needed.

    The folder is ``<root or cache_dir()>/<name>`` with a ``dataset.json`` description and, for
    digits, ``train/<class>/*.png`` and ``val/<class>/*.png`` (readable by
    ``find_labeled_images``); for scenes, see ``scenes.write_scenes``. It is built in a hidden
    staging folder and swapped in whole, so an interrupted run never leaves a partial dataset.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; available: {', '.join(DATASETS)}")
    target = (Path(root).expanduser() if root is not None else cache_dir()) / name
    if not _is_complete(target):  # absent, or an older format: (re)build it
        with atomic_directory(target, overwrite=True) as staging:
            info = _write_digits(staging) if name == "digits" else write_scenes(staging)
            write_json(staging / "dataset.json", {**info, "format_version": _FORMAT_VERSION})
    return target


def _is_complete(folder: Path) -> bool:
    try:
        info = read_json(folder / "dataset.json")
    except InputError:
        return False
    return isinstance(info, dict) and info.get("format_version") == _FORMAT_VERSION


def _write_digits(folder: Path) -> dict:
    with np.load(_ASSETS / "digits.npz") as data:
        images, labels, is_val = data["images"], data["labels"], data["val"]
    pixels = np.rint(images.astype(np.float32) * (255.0 / 16.0)).astype(np.uint8)
    classes = [str(c) for c in range(10)]
    for split in ("train", "val"):
        for c in classes:
            (folder / split / c).mkdir(parents=True)
    size = (DIGITS_SIZE, DIGITS_SIZE)
    for i, (a, label, val) in enumerate(zip(pixels, labels, is_val, strict=True)):
        img = Image.fromarray(a, "L").resize(size, Image.Resampling.BICUBIC).convert("RGB")
        img.save(folder / ("val" if val else "train") / str(label) / f"{i:04d}.png")
    info = {
        "name": "digits",
        "image_size": DIGITS_SIZE,
        "classes": classes,
        "train": int((~is_val).sum()),
        "val": int(is_val.sum()),
        "license": "CC BY 4.0",
        "source": (
            "E. Alpaydin, C. Kaynak, Optical Recognition of Handwritten Digits, "
            "UCI Machine Learning Repository, 1998 (scikit-learn load_digits)"
        ),
    }
    return info
