"""Shared by the index tests: real photos (scikit-image), a tiny saved model, a fast fake encoder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import skimage.data
from PIL import Image

from mlx_aim.checkpoints.registry import aim_v2_preprocessing
from mlx_aim.checkpoints.weights import save_model
from mlx_aim.data.images import ImageError
from mlx_aim.models import build_model

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "clock", "brick")
TINY = {
    "model_type": "aim_v2",
    "image_size": 56,
    "patch_size": 14,
    "embed_dim": 32,
    "num_blocks": 2,
    "num_heads": 2,
    "mlp_hidden_dim": 48,
}


def write_photos(folder: Path, names=PHOTOS) -> list[Path]:
    """scikit-image's photographs as JPEG files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        paths.append(folder / f"{name}.jpg")
        Image.fromarray(getattr(skimage.data, name)()).save(paths[-1], quality=90)
    return paths


def resized_copy(photo: Path, target: Path, scale: float = 0.6) -> Path:
    """A smaller, re-encoded copy of ``photo``."""
    with Image.open(photo) as image:
        size = (round(image.width * scale), round(image.height * scale))
        image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=75)
    return target


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    mx.random.seed(seed)
    model = build_model(TINY)
    model.eval()
    return save_model(model, folder, preprocessing=aim_v2_preprocessing(TINY["image_size"]))


def save_tiny_lit(folder: Path, seed: int = 0) -> Path:
    """A random tiny LiT model (image and text towers) with a CLIP-format tokenizer beside it."""
    from clip_vocab import write_clip_vocab
    from test_zero_shot import lit_config

    from mlx_aim.text.clip_tokenizer import copy_tokenizer_files, load_tokenizer

    vocab = write_clip_vocab(folder.parent / f"{folder.name}-vocab")
    mx.random.seed(seed)
    model = build_model(lit_config(load_tokenizer(vocab).vocab_size))
    saved = save_model(model, folder, preprocessing=aim_v2_preprocessing(28))
    copy_tokenizer_files(vocab, saved)
    return saved


class FakeEncoder:
    """An encoder that reads files through the index's opener (hash and decode) and maps each
    content to a fixed random unit vector, without a model."""

    def __init__(self, dim: int = 8, digest: str = "fake"):
        self.identity = {"model": "fake", "digest": digest, "pool": "mean", "dim": dim}
        self.embedded: list[str] = []

    def vector(self, data: bytes) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        v = np.random.default_rng(seed).standard_normal(self.identity["dim"])
        return (v / np.linalg.norm(v)).astype(np.float32)

    def stream(self, paths, on_error, opener):
        for path in paths:
            try:
                opener(Path(path))
            except ImageError as e:
                on_error(e)
                continue
            self.embedded.append(path)
            yield [path], self.vector(Path(path).read_bytes())[None]

    def images(self, paths):
        return np.stack([self.vector(Path(p).read_bytes()) for p in paths])

    def texts(self, texts):
        return np.stack([self.vector(t.encode()) for t in texts])


def tiny_png(path: Path, seed: int) -> Path:
    """A distinct 2x2 PNG (fast to write and decode)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)).save(path)
    return path
