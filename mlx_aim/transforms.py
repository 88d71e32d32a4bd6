"""Image preprocessing and augmentation: PIL in, normalized float32 (H, W, 3) numpy arrays out.

Every transform is called as ``transform(img, rng)`` with a ``numpy.random.Generator``; the
deterministic ones (``Preprocess``, ``NativeResolution``) ignore ``rng`` so that the data loader
drives all of them the same way. Geometry follows the reference pipelines on PIL images:
shortest-edge resize with ``int()`` truncation of the long side, centre-crop offsets rounded
(torchvision, AIMv1) or floored (Hugging Face, AIMv2), and torchvision's RandomResizedCrop
sampling (with numpy's generator instead of torch's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .images import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Triple = tuple[float, float, float]

_MAX_ASPECT = 16  # Preprocess crops before resizing images more elongated than this

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


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing: resize the shortest edge, centre-crop, normalize.

    ``__call__(img, rng=None)`` returns float32 (crop, crop, 3); ``rng`` is ignored.
    ``crop_offsets`` is ``"round"`` (torchvision, AIMv1) or ``"floor"`` (Hugging Face's
    CLIPImageProcessor, AIMv2); see ``center_crop_box``. Images more elongated than 16:1 are
    cropped before resizing, so a 2x3000 banner does not become a 256x384000 intermediate.
    """

    resize: int
    crop: int
    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_offsets: str = "round"

    def __post_init__(self):
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"need 0 < crop <= resize, got crop={self.crop} resize={self.resize}")
        resampling(self.interpolation)
        if self.crop_offsets not in ("round", "floor"):
            raise ValueError(f"crop_offsets must be 'round' or 'floor', got {self.crop_offsets!r}")

    @classmethod
    def aimv1(cls, size: int = 224) -> Preprocess:
        """AIMv1 evaluation: resize ``ceil(size / 0.875)``, crop ``size``, ImageNet mean/std."""
        return cls(math.ceil(size / 0.875), size, IMAGENET_MEAN, IMAGENET_STD)

    @classmethod
    def aimv2(cls, size: int = 224) -> Preprocess:
        """AIMv2 (Hugging Face processor): resize ``size``, crop ``size``, CLIP mean/std."""
        return cls(size, size, CLIP_MEAN, CLIP_STD, crop_offsets="floor")

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
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
