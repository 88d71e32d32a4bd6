"""Image preprocessing and augmentation: PIL in, normalized float32 (H, W, 3) numpy arrays out.

Every transform is called as ``transform(img, rng)`` with a ``numpy.random.Generator``; the
deterministic ones (``Preprocessing``, ``NativeResolution``) ignore ``rng`` so that the data loader
drives all of them the same way. Geometry follows the reference pipelines on PIL images:
shortest-edge resize with ``int()`` truncation of the long side, centre-crop offsets rounded
(torchvision, AIMv1) or floored (Hugging Face, AIMv2), and torchvision's RandomResizedCrop
sampling (with numpy's generator instead of torch's).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError
from .images import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Triple = tuple[float, float, float]

_MAX_ASPECT = 16  # Preprocessing crops before resizing images more elongated than this
MAX_SIZE = 4096  # the largest resize / crop a Preprocessing accepts (a 4096^2 input is 200 MB)

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resampling(name: str) -> Image.Resampling:
    """The Pillow filter for an interpolation name (``"bicubic"``, ``"bilinear"``, ...)."""
    try:
        return _RESAMPLING[name]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {name!r}; choose from {sorted(_RESAMPLING)}"
        ) from None


def normalize(img: Image.Image, mean: Triple, std: Triple, hflip: bool = False) -> np.ndarray:
    """(H, W, 3) float32: ``(pixels / 255 - mean) / std``, optionally mirrored left-right."""
    a = np.asarray(img if img.mode == "RGB" else to_rgb(img))
    if hflip:
        a = a[:, ::-1]
    std = np.asarray(std, np.float64)
    x = a.astype(np.float32)  # in place from here on: this is the loader's hot loop
    x *= (1.0 / (255.0 * std)).astype(np.float32)
    x -= (np.asarray(mean, np.float64) / std).astype(np.float32)
    return x


def denormalize(x, mean: Triple, std: Triple) -> np.ndarray:
    """Invert ``normalize`` for any (..., 3) array: uint8 pixels, rounded and clipped."""
    x = np.asarray(x, dtype=np.float32)
    pixels = (x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size`` and the longer ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_shortest_edge(
    img: Image.Image, size: int, interpolation: str = "bicubic"
) -> Image.Image:
    """Resize so that the shorter side is ``size`` (see ``shortest_edge_size``)."""
    if min(img.size) == size:
        return img
    return img.resize(shortest_edge_size(*img.size, size), resampling(interpolation))


def center_crop_box(width: int, height: int, size: int, offsets: str = "round") -> tuple:
    """(left, top, right, bottom) of the central ``size`` x ``size`` square.

    ``offsets="round"`` places it at ``round((side - size) / 2)`` like torchvision;
    ``"floor"`` at ``(side - size) // 2`` like Hugging Face's PIL image processors. They differ
    by one pixel when ``side - size`` is odd.
    """
    if size > min(width, height):
        raise ValueError(f"cannot centre-crop {size} px from a {width}x{height} image")
    if offsets == "round":
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    elif offsets == "floor":
        top, left = (height - size) // 2, (width - size) // 2
    else:
        raise ValueError(f"offsets must be 'round' or 'floor', got {offsets!r}")
    return left, top, left + size, top + size


def center_crop(img: Image.Image, size: int, offsets: str = "round") -> Image.Image:
    """Crop the central ``size`` x ``size`` square (see ``center_crop_box``)."""
    return img.crop(center_crop_box(*img.size, size, offsets))


def _is_triple(value: Any) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and all(math.isfinite(v) for v in value)
    )


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a model (``preprocess.json``), and the transform applying it.

    Resize the shortest edge to ``resize``, centre-crop ``crop``, normalize with ``mean`` and
    ``std``. ``crop_offsets`` is ``"round"`` (torchvision, AIMv1) or ``"floor"`` (Hugging Face's
    CLIPImageProcessor, AIMv2); see ``center_crop_box``. ``native`` models keep the aspect ratio
    and pad to whole patches instead (``NativeResolution``, which needs the model's patch size).

    ``__call__(img, rng=None)`` returns float32 (crop, crop, 3); ``rng`` is ignored. Images more
    elongated than 16:1 are cropped before resizing, so a 2x3000 banner does not become a
    256x384000 intermediate. Invalid values raise ``InputError`` naming the field.
    """

    resize: int
    crop: int
    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_offsets: str = "round"
    native: bool = False

    def __post_init__(self):
        for name in ("mean", "std"):
            if isinstance(getattr(self, name), list):  # as read from JSON
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool)):
                raise InputError(f"preprocessing '{name}' must be an integer, got {value!r}")
            if not 0 < value <= MAX_SIZE:
                raise InputError(f"preprocessing '{name}' must be in 1..{MAX_SIZE}, got {value}")
        if self.crop > self.resize:
            raise InputError(f"preprocessing needs crop <= resize, got {self.crop} > {self.resize}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not _is_triple(value) or (name == "std" and min(value) <= 0):
                kind = "finite positive numbers" if name == "std" else "finite numbers"
                raise InputError(f"preprocessing '{name}' must be 3 {kind}, got {value!r}")
        if self.interpolation not in _RESAMPLING:
            raise InputError(
                f"preprocessing 'interpolation' must be one of {sorted(_RESAMPLING)}, "
                f"got {self.interpolation!r}"
            )
        if self.crop_offsets not in ("round", "floor"):
            raise InputError(
                f"preprocessing 'crop_offsets' must be 'round' or 'floor', got {self.crop_offsets!r}"
            )
        if not isinstance(self.native, bool):
            raise InputError(f"preprocessing 'native' must be true or false, got {self.native!r}")

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocess.json`` content."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Any, defaults: Preprocessing | None = None) -> Preprocessing:
        """Read ``preprocess.json`` content; absent optional fields come from ``defaults``."""
        if not isinstance(d, dict):
            raise InputError(f"preprocessing must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown preprocessing field(s) {unknown}")
        missing = sorted({"resize", "crop", "mean", "std"} - set(d))
        if missing:
            raise InputError(f"preprocessing lacks field(s) {missing}")
        return cls(**{**(asdict(defaults) if defaults else {}), **d})

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        if self.native:
            raise ValueError("native preprocessing needs the patch size: use NativeResolution")
        w, h = img.size
        if max(w, h) > _MAX_ASPECT * min(w, h):
            return normalize(self._crop_then_resize(img), self.mean, self.std)
        img = resize_shortest_edge(img, self.resize, self.interpolation)
        img = center_crop(img, self.crop, self.crop_offsets)
        return normalize(img, self.mean, self.std)

    def _crop_then_resize(self, img: Image.Image) -> Image.Image:
        """Resize only the source region that the centre crop keeps.

        Used for very elongated images, whose full shortest-edge resize would be huge (a 2x3000
        image at 256 px is 256x384000). Same geometry; pixels differ slightly from
        resize-then-crop because Pillow's two resampling passes round in a different order.
        """
        w, h = img.size
        resized_w, resized_h = shortest_edge_size(w, h, self.resize)
        left, top, right, bottom = center_crop_box(
            resized_w, resized_h, self.crop, self.crop_offsets
        )
        sx, sy = w / resized_w, h / resized_h
        box = (left * sx, top * sy, right * sx, bottom * sy)
        return img.resize((self.crop, self.crop), resampling(self.interpolation), box=box)


def native_size(width: int, height: int, patch_size: int, max_patches: int | None):
    """(width, height) to resize to so that ``ceil(h/p) * ceil(w/p) <= max_patches``.

    Keeps the aspect ratio as closely as whole pixels allow, never upscales, and returns the
    input size when it already fits.
    """
    p = patch_size
    if max_patches is None or math.ceil(width / p) * math.ceil(height / p) <= max_patches:
        return width, height
    if max_patches < 1:
        raise ValueError(f"max_patches must be >= 1, got {max_patches}")
    # the grid (rows x cols, rows * cols <= max_patches) that allows the largest scale
    scale, rows, cols = max(
        (min(r * p / height, (max_patches // r) * p / width), r, max_patches // r)
        for r in range(1, min(max_patches, math.ceil(height / p)) + 1)  # more rows: no larger
    )
    w = min(max(1, int(width * scale + 1e-6)), cols * p)
    h = min(max(1, int(height * scale + 1e-6)), rows * p)
    return w, h


def native_resolution(
    img: Image.Image,
    patch_size: int,
    mean: Triple,
    std: Triple,
    max_patches: int | None = None,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """Native-resolution input: keep the aspect ratio, pad to whole patches.

    Optionally downscales (never upscales) so the patch grid has at most ``max_patches``
    patches, normalizes, then pads the bottom and right edges up to multiples of
    ``patch_size`` with zeros AFTER normalization (so padding is the mean colour).
    Returns float32 (H', W', 3) with H' and W' multiples of ``patch_size``.
    """
    w, h = native_size(*img.size, patch_size, max_patches)
    if (w, h) != img.size:
        img = img.resize((w, h), resampling(interpolation))
    x = normalize(img, mean, std)
    pad_h, pad_w = -h % patch_size, -w % patch_size
    if pad_h or pad_w:
        x = np.pad(x, ((0, pad_h), (0, pad_w), (0, 0)))
    return x


@dataclass(frozen=True)
class NativeResolution:
    """``native_resolution`` as a loader transform: ``__call__(img, rng=None)``."""

    patch_size: int
    mean: Triple = CLIP_MEAN
    std: Triple = CLIP_STD
    max_patches: int | None = None
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        return native_resolution(
            img, self.patch_size, self.mean, self.std, self.max_patches, self.interpolation
        )


@dataclass(frozen=True)
class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` and aspect ratio in ``ratio``; resize to ``size``.

    Sampling follows torchvision: 10 tries, then a central crop with the ratio clamped.
    """

    size: int
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"

    def params(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, ...]:
        """(top, left, crop height, crop width) for an image of ``width`` x ``height``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, max(1, int(round(width / min(self.ratio))))
        elif in_ratio > max(self.ratio):
            w, h = max(1, int(round(height * max(self.ratio)))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        top, left, h, w = self.params(*img.size, rng)
        img = img.crop((left, top, left + w, top + h))
        return img.resize((self.size, self.size), resampling(self.interpolation))


@dataclass(frozen=True)
class TrainTransform:
    """Pre-training augmentation: RandomResizedCrop, horizontal flip, normalize."""

    size: int
    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        crop = RandomResizedCrop(self.size, self.scale, self.ratio, self.interpolation)
        img = crop(img, rng)
        return normalize(img, self.mean, self.std, hflip=bool(rng.random() < self.hflip))
