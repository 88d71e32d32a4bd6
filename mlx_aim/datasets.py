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

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .images import PathLike
from .scenes import write_scenes

DATASETS = ("digits", "scenes")
DIGITS_SIZE = 32
_ASSETS = Path(__file__).parent / "assets"
_FORMAT_VERSION = 1


def cache_dir() -> Path:
    """Where built-in datasets live: ``$MLX_AIM_CACHE/datasets`` or ``~/.cache/mlx-aim/datasets``."""
    base = os.environ.get("MLX_AIM_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "mlx-aim") / "datasets"


def builtin_dataset(name: str = "digits", root: PathLike | None = None) -> Path:
    """Return the folder of a built-in dataset, writing it first if needed.

    The folder is ``<root or cache_dir()>/<name>`` with a ``dataset.json`` description and, for
    digits, ``train/<class>/*.png`` and ``val/<class>/*.png`` (readable by
    ``find_labeled_images``); for scenes, see ``scenes.write_scenes``. It is built in a
    temporary folder and renamed into place, so an interrupted run never leaves a partial
    dataset.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; available: {', '.join(DATASETS)}")
    parent = Path(root).expanduser() if root is not None else cache_dir()
    target = parent / name
    if _is_complete(target):
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        info = _write_digits(tmp) if name == "digits" else write_scenes(tmp)
        info["format_version"] = _FORMAT_VERSION
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
        if target.exists() and not _is_complete(target):  # an older format: replace it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    try:
        info = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("format_version") == _FORMAT_VERSION


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
