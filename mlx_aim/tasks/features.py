"""Frozen-trunk features shared by ``mlx-aim probe`` and ``mlx-aim embed``.

- ``vision_model``: the image trunk of anything ``mlx_aim.load`` returns (a pre-training model's
  encoder, a classifier's trunk).
- ``image_transform`` / ``preprocess``: a model's evaluation preprocessing (``model.preprocessing``).
- ``BatchRunner``: a compiled forward on batches of one fixed size (a short last batch is padded).
- ``layer_average``: the AIMv1 feature, the mean of chosen raw block outputs.
- ``compute_feature_set`` / ``FeatureCache``: features of a labelled image list, cached on disk as
  float16 and keyed by the trunk's weights, the image files and the settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from PIL import Image

from ..checkpoints.registry import default_preprocessing
from ..cpu.streams import StreamSplit, cpu_stream_count
from ..data.images import ImageError, open_image, to_rgb
from ..data.transforms import NativeResolution, Preprocessing
from ..env import cache_root
from ..io import atomic_paths
from ..models.encoder import layer_average as layer_average  # the one definition; re-exported

# AIMv2-native accepts 112 to 4096 patches; larger images are downscaled to fit.
NATIVE_MAX_PATCHES = 4096
CACHE_VERSION = 1

ImageLike = str | os.PathLike | Image.Image | np.ndarray


def vision_model(model: nn.Module) -> nn.Module:
    """The image trunk of ``model``: the encoder of a pre-training model, the image tower of a LiT
    model, else ``model`` itself."""
    if model.args.model_type == "aim_v2_lit":
        return model.image_encoder
    return model.encoder if model.args.model_type == "aim_pretrain" else model


def image_transform(model: nn.Module) -> Callable[..., np.ndarray]:
    """``model``'s evaluation preprocessing as a loader transform ``(PIL image) -> (H, W, 3)``.

    Uses ``model.preprocessing`` (set by ``mlx_aim.load``) or the family default. Centre-crop
    offsets follow each family's reference pipeline: torchvision's rounding for AIMv1, Hugging
    Face's flooring for AIMv2. Native-resolution models keep the aspect ratio and pad to whole
    patches (at most ``NATIVE_MAX_PATCHES`` patches).
    """
    args = vision_model(model).args
    prep = getattr(model, "preprocessing", None) or default_preprocessing(args.to_dict())
    if prep.native:
        return NativeResolution(
            args.patch_size, prep.mean, prep.std, NATIVE_MAX_PATCHES, prep.interpolation
        )
    return crop_transform(prep, args.model_type)


def crop_transform(prep: Preprocessing, model_type: str) -> Preprocessing:
    """Resize + centre-crop + normalize with the crop rounding of the family's reference pipeline
    (torchvision's for AIMv1, Hugging Face's for AIMv2)."""
    offsets = "floor" if model_type == "aim_v2" else "round"
    return Preprocessing(prep.resize, prep.crop, prep.mean, prep.std, prep.interpolation, offsets)


def as_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, or an (H, W[, 3]) array of pixels.

    Arrays are uint8 in [0, 255] or floats in [0, 1]. Unreadable files raise ``ImageError``.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3)):
            raise ValueError(
                f"an image array must be (H, W) or (H, W, 3) pixels, got shape {image.shape}"
            )
        if image.dtype != np.uint8:
            image = np.clip(np.rint(np.asarray(image, np.float64) * 255.0), 0, 255)
            image = image.astype(np.uint8)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        return to_rgb(Image.fromarray(image))
    return open_image(image)


def to_nhwc(batch: mx.array | np.ndarray) -> mx.array:
    """A 4-D batch as NHWC; NCHW is accepted (and transposed) when axis 1 is 3 and the last isn't."""
    batch = mx.array(batch) if not isinstance(batch, mx.array) else batch
    if batch.ndim != 4:
        raise ValueError(f"a batch must be 4-D (B, H, W, 3), got shape {tuple(batch.shape)}")
    if batch.shape[-1] != 3 and batch.shape[1] == 3:
        batch = batch.transpose(0, 2, 3, 1)
    return batch


def preprocess(model: nn.Module, images: ImageLike | Sequence[ImageLike]) -> mx.array:
    """Model input (B, H, W, 3) for images given as paths, PIL images or pixel arrays.

    Example::

        model = mlx_aim.load("aimv2-large-patch14-224")
        x = preprocess(model, ["cat.jpg", Image.open("dog.png")])  # (2, 224, 224, 3)
    """
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    transform = image_transform(model)
    arrays = [transform(as_pil(image)) for image in images]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(
            "native-resolution images of different sizes cannot share a batch; "
            "preprocess them one at a time"
        )
    return mx.array(np.stack(arrays))


class BatchRunner:
    """Apply ``fn`` to batches of at most ``batch_size`` rows (images or features).

    ``fn`` is compiled once (``state``: arrays it reads, e.g. ``model.state``); a short batch is
    zero-padded to ``batch_size`` so the compiled graph keeps its shape, and the padding rows are
    cut from the result. On the CPU a batch is split over CPU streams that run in parallel
    (``cpu.streams``; ``streams`` overrides the count). Every call evaluates its result. With
    ``compile=False`` (inputs of varying size, e.g. native resolution) nothing is padded or split.
    """

    def __init__(
        self,
        fn: Callable[[mx.array], Any],
        batch_size: int,
        state: Any = None,
        compile: bool = True,
        streams: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.padded = compile
        streams = (cpu_stream_count(batch_size) if streams is None else streams) if compile else 1
        self.batch_size = math.ceil(batch_size / streams) * streams  # equal chunks
        self.run = StreamSplit(mx.compile(fn, inputs=state) if compile else fn, streams)

    def __call__(self, batch: mx.array | np.ndarray) -> Any:
        batch = batch if isinstance(batch, mx.array) else mx.array(batch)
        n = batch.shape[0]
        if n > self.batch_size:
            raise ValueError(f"batch of {n} exceeds the batch size {self.batch_size}")
        if self.padded and n < self.batch_size:
            pad = mx.zeros((self.batch_size - n, *batch.shape[1:]), batch.dtype)
            batch = mx.concatenate([batch, pad])
        out = self.run(batch)
        return tree_map(lambda a: a[:n], out)


# --------------------------------------------------------------------------------------------
# labelled feature sets and their cache


@dataclass
class FeatureSet:
    """Features (N, T, D) of the readable images of a split, their labels and paths."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


class _Float16Overflow(Exception):
    pass


def compute_feature_set(
    runner: BatchRunner,
    items: Sequence[tuple[str | os.PathLike, int]],
    transform: Callable[..., np.ndarray],
    *,
    out_file: Path | None = None,
    dtype: type = np.float16,
    num_workers: int = 2,
    on_error: Callable[[ImageError], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> FeatureSet:
    """Run ``runner`` over the labelled images ``items`` in order; unreadable files are skipped.

    Features are stored as ``dtype`` in RAM or, with ``out_file``, in a memory-mapped ``.npy``.
    If a float16 value would overflow, the extraction is redone in float32.
    """
    from ..data.loader import ImageLoader

    errors: list[str] = []

    def skip(error: ImageError) -> None:
        errors.append(str(error))
        if on_error is not None:
            on_error(error)

    loader = ImageLoader.in_order(
        items, transform, runner.batch_size, num_workers=num_workers, on_error=skip
    )
    store = None
    labels: list[int] = []
    paths: list[str] = []
    reported = 0
    try:
        for batch in loader:
            out = np.asarray(runner(batch["images"]).astype(mx.float32))
            if dtype == np.float16 and np.abs(out).max() > np.finfo(np.float16).max:
                raise _Float16Overflow
            if store is None:
                shape = (len(items), *out.shape[1:])
                store = (
                    np.lib.format.open_memmap(out_file, "w+", dtype, shape)
                    if out_file is not None
                    else np.empty(shape, dtype)
                )
            store[len(paths) : len(paths) + len(out)] = out
            labels.extend(int(y) for y in batch["labels"])
            paths.extend(str(p) for p in batch["paths"])
            if progress is not None:
                progress(len(paths) + len(errors) - reported)
                reported = len(paths) + len(errors)
    except _Float16Overflow:
        if progress is not None:
            progress(-reported)
        del store
        return compute_feature_set(
            runner,
            items,
            transform,
            out_file=out_file,
            dtype=np.float32,
            num_workers=num_workers,
            on_error=on_error,
            progress=progress,
        )
    if progress is not None and len(items) > reported:
        progress(len(items) - reported)  # trailing unreadable files
    if store is None:
        store = np.empty((0,), dtype)
    elif isinstance(store, np.memmap):
        store.flush()
    return FeatureSet(store[: len(paths)], np.asarray(labels, np.int32), paths, errors)


def default_cache_dir() -> Path:
    """``$MLX_AIM_CACHE/features``, else ``~/.cache/mlx-aim/features``."""
    return cache_root() / "features"


def model_fingerprint(model: nn.Module) -> str:
    """Hash of a trunk's config and weights (any classifier head excluded)."""
    trunk = vision_model(model)
    h = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in trunk.args.to_dict().items() if k not in ("num_classes", "head")}
    h.update(json.dumps(config, sort_keys=True).encode())
    for key, value in sorted(tree_flatten(trunk.parameters()), key=lambda kv: kv[0]):
        if key.startswith("head."):
            continue
        h.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        if value.dtype == mx.bfloat16:
            value = value.view(mx.uint16)
        h.update(np.ascontiguousarray(np.asarray(value)).tobytes())
    return h.hexdigest()


def items_fingerprint(items: Sequence[tuple[str | os.PathLike, int]]) -> str:
    """Hash of labelled image files: resolved paths, labels, sizes and modification times."""
    h = hashlib.blake2b(digest_size=16)
    for path, label in items:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{os.path.realpath(path)}\0{label}\0{stamp}\n".encode())
    return h.hexdigest()


class FeatureCache:
    """Feature sets on disk: ``<key>.npy`` (float16, memory-mapped) and ``<key>.json``.

    An entry is written through ``io.atomic_paths`` (temporary files renamed into place, the JSON
    last), so a reader sees a complete entry or none.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    @staticmethod
    def key(*parts: Any) -> str:
        """A cache key from JSON-able parts (fingerprints, settings)."""
        blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
        return hashlib.blake2b(blob.encode(), digest_size=20).hexdigest()

    def load(self, key: str) -> FeatureSet | None:
        """The cached entry, or None when absent or unreadable."""
        meta_file, npy_file = self.root / f"{key}.json", self.root / f"{key}.npy"
        try:
            meta = json.loads(meta_file.read_text())
            features = np.load(npy_file, mmap_mode="r") if meta["count"] else np.empty((0,))
        except (OSError, ValueError, KeyError):
            return None
        count = meta["count"]
        return FeatureSet(
            features[:count], np.asarray(meta["labels"], np.int32), meta["paths"], meta["errors"]
        )

    def get_or_compute(
        self, key: str, compute: Callable[[Path], FeatureSet]
    ) -> tuple[FeatureSet, bool]:
        """``(entry, hit)``: the cached entry, or ``compute(npy_file)`` stored under ``key``."""
        cached = self.load(key)
        if cached is not None:
            return cached, True
        files = (self.root / f"{key}.npy", self.root / f"{key}.json")
        with atomic_paths(*files) as (npy_file, meta_file):  # the JSON, read first, renamed last
            result = compute(npy_file)
            meta = {
                "count": len(result),
                "labels": result.labels.tolist(),
                "paths": result.paths,
                "errors": result.errors,
            }
            meta_file.write_text(json.dumps(meta))
        return self.load(key) or result, False
