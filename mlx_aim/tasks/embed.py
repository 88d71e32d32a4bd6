"""Image embeddings from AIM trunks (the library side of ``mlx-aim embed``).

Example::

    import mlx_aim
    from mlx_aim.tasks.embed import embed_images

    model = mlx_aim.load("aimv2-large-patch14-224")
    vectors = embed_images(model, ["cat.jpg", Image.open("dog.png")], normalize=True)  # (2, 1024)

Images are prepared with the checkpoint's own preprocessing (``model.preprocessing``); the
native-resolution AIMv2 keeps each image's aspect ratio and pads it to whole patches.

Poolings: ``mean`` (mean of the final-norm tokens, the AIMv2 default), ``head`` (the attention
pool of the model's classifier head), ``layers`` (token mean of the average of chosen raw block
outputs, the AIMv1 convention, default for AIMv1 trunks), ``tokens`` (all final-norm patch tokens,
(N, D) per image), ``projection`` (a LiT model's image embedding, in the space of its text
embeddings; its default). ``auto`` picks ``projection`` for LiT, ``head`` when the model has one,
else the family default.

``embed_texts`` embeds strings with a LiT model's text tower and tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from ..data.images import ImageError
from ..data.loader import ImageLoader
from ..errors import InputError
from ..io import atomic_paths
from ..models.aim_v2_lit import l2_normalize
from ..text.clip_tokenizer import model_tokenizer
from .config import POOLS, EmbedConfig
from .features import (
    BatchRunner,
    ImageLike,
    as_pil,
    image_transform,
    layer_average,
    to_nhwc,
    vision_model,
)

FORMATS = (".npy", ".safetensors", ".jsonl")
PATHS_SUFFIX = ".paths.txt"

Embeddings = np.ndarray | list[np.ndarray]


def default_pool(model: nn.Module) -> str:
    """``projection`` for LiT, ``head`` for a model with a classifier head, ``mean`` for AIMv2,
    ``layers`` for AIMv1."""
    if model.args.model_type == "aim_v2_lit":
        return "projection"
    trunk = vision_model(model)
    if "head" in trunk:
        return "head"
    return "mean" if trunk.args.model_type == "aim_v2" else "layers"


def pooling(
    model: nn.Module, pool: str = "auto", layers: Sequence[int] | None = None
) -> Callable[[mx.array], mx.array]:
    """The function images (B, H, W, 3) -> embeddings (B, D) (or (B, N, D) for ``tokens``)."""
    trunk = vision_model(model)
    pool = default_pool(model) if pool == "auto" else pool
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if layers is not None and pool != "layers":
        raise ValueError("layers only apply to the 'layers' pooling")
    if pool == "projection":
        if model.args.model_type != "aim_v2_lit":
            raise ValueError("only LiT models (with a text tower) have the 'projection' pooling")
        return model.encode_image
    if pool == "head":
        if "head" not in trunk:
            raise ValueError("this model has no classifier head to pool with; use mean or layers")
        return lambda x: trunk.head.pool(trunk.probe_features(x))
    if pool == "layers":
        chosen = list(layers) if layers is not None else trunk.args.feature_layers
        n = trunk.args.num_blocks
        if not chosen or not all(0 <= i < n for i in chosen):
            raise ValueError(f"layers {chosen} must name blocks in 0..{n - 1}")
        return lambda x: layer_average(trunk, x, chosen).mean(axis=1)
    if pool == "tokens":
        return trunk.encode
    return lambda x: trunk.encode(x).mean(axis=1)


def quantize(model: nn.Module, bits: int, group_size: int = 64) -> int:
    """Quantize ``model``'s linear layers in place with ``mlx.nn.quantize``; returns how many.

    Layers whose input width is not a multiple of ``group_size`` use group size 32, or stay in
    floating point when 32 does not divide it either (as mlx-lm skips them).
    """
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits}")
    count = 0

    def predicate(path: str, module: nn.Module) -> bool | dict:
        nonlocal count
        if not isinstance(module, nn.Linear):
            return False
        width = module.weight.shape[1]
        size = next((g for g in (group_size, 32) if width % g == 0), None)
        if size is None:
            return False
        count += 1
        return {"group_size": size, "bits": bits}

    nn.quantize(model, group_size, bits, class_predicate=predicate)
    return count


@dataclass
class EmbedResult:
    """Embeddings of the readable files, in input order, with their paths and the failures."""

    embeddings: Embeddings
    paths: list[str]
    errors: list[ImageError] = field(default_factory=list)


class Embedder:
    """Reusable embedding pipeline: preprocessing, compiled batched forward, pooling.

    ``embedder(images)`` embeds a list of paths / PIL images / pixel arrays (or an already
    preprocessed 4-D batch, NHWC or NCHW) and returns float32 numpy (B, D) (or (B, N, D) for
    ``tokens``). ``embed_files`` streams many files with background decoding and skips
    unreadable ones.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pool: str = "auto",
        layers: Sequence[int] | None = None,
        normalize: bool = False,
        batch_size: int = 16,
    ):
        self.model = model
        self.pool = default_pool(model) if pool == "auto" else pool
        self.normalize = normalize
        trunk = vision_model(model)
        self.native = trunk.args.model_type == "aim_v2" and trunk.args.native_resolution
        self.transform = image_transform(model)
        dtype = trunk.preprocessor.patchifier.proj.weight.dtype
        fn = pooling(model, pool, layers)

        def forward(x: mx.array) -> mx.array:
            out = fn(x.astype(dtype)).astype(mx.float32)
            if normalize:
                out = out / mx.maximum(mx.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
            return out

        # Native-resolution inputs vary in size: run them one by one, uncompiled.
        self.batch_size = 1 if self.native else batch_size
        self.runner = BatchRunner(forward, self.batch_size, model.state, compile=not self.native)

    @property
    def ragged(self) -> bool:
        """Whether results can differ in shape between images (native-resolution tokens)."""
        return self.native and self.pool == "tokens"

    def embed_batch(self, batch: mx.array | np.ndarray) -> np.ndarray:
        """Embeddings of a preprocessed batch (B, H, W, 3) (NCHW accepted)."""
        batch = to_nhwc(batch)
        out = [
            np.asarray(self.runner(batch[i : i + self.batch_size]))
            for i in range(0, batch.shape[0], self.batch_size)
        ]
        return np.concatenate(out)

    def __call__(self, images: ImageLike | Sequence[ImageLike] | mx.array) -> Embeddings:
        if isinstance(images, (mx.array, np.ndarray)) and images.ndim == 4:
            return self.embed_batch(images)
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        arrays = [self.transform(as_pil(image)) for image in images]
        out = [self.embed_batch(a[None])[0] for a in arrays] if self.native else None
        if out is None:
            return self.embed_batch(np.stack(arrays)) if arrays else np.zeros((0,), np.float32)
        return _stack(out)

    def embed_files(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        on_error: Callable[[ImageError], None] | None = None,
        progress: Callable[[int], None] | None = None,
        num_workers: int = 2,
    ) -> EmbedResult:
        """Embed image files in order; unreadable files are reported and skipped."""
        errors: list[ImageError] = []

        def skip(error: ImageError) -> None:
            errors.append(error)
            if on_error is not None:
                on_error(error)

        out: list[np.ndarray] = []
        done: list[str] = []
        if not paths:
            return EmbedResult(np.zeros((0,), np.float32), [], [])
        loader = ImageLoader.in_order(
            [str(p) for p in paths],
            self.transform,
            self.batch_size,
            num_workers=num_workers,
            on_error=skip,
        )
        try:
            for batch in loader:
                out.extend(np.asarray(self.runner(batch["images"])))
                done.extend(str(p) for p in batch["paths"])
                if progress is not None:
                    progress(len(batch["paths"]))
        except ValueError:
            if len(errors) < len(paths):
                raise  # not the loader's "no image could be read"
        return EmbedResult(_stack(out), done, errors)


def load_embedder(config: EmbedConfig) -> Embedder:
    """The model of ``config`` loaded (and quantized) as an :class:`Embedder` with its pooling;
    bad settings are ``InputError``s."""
    from ..checkpoints.loading import load
    from ..checkpoints.registry import resolve_layers

    net = load(config.model, dtype=getattr(mx, config.dtype))
    layers = config.layers
    try:
        chosen = (
            None if layers is None else resolve_layers(layers, vision_model(net).args, config.model)
        )
        if config.quantize is not None:
            quantize(net, config.quantize)
        embedder = Embedder(
            net,
            pool=config.pooling,
            layers=chosen,
            normalize=config.normalize,
            batch_size=config.batch_size,
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    output = config.output
    if embedder.ragged and output is not None and output_format(output) != ".jsonl":
        raise InputError(
            f"{output}: native-resolution tokens differ in count between images; write them as "
            ".jsonl"
        )
    return embedder


def _stack(arrays: list[np.ndarray]) -> Embeddings:
    if not arrays:
        return np.zeros((0,), np.float32)
    if len({a.shape for a in arrays}) > 1:
        return arrays
    return np.stack(arrays)


def embed_images(
    model: nn.Module,
    images: ImageLike | Sequence[ImageLike] | mx.array,
    *,
    pool: str = "auto",
    layers: Sequence[int] | None = None,
    normalize: bool = False,
    batch_size: int = 16,
) -> Embeddings:
    """Embeddings (B, D) float32 of paths, PIL images, pixel arrays or a preprocessed batch."""
    embedder = Embedder(model, pool=pool, layers=layers, normalize=normalize, batch_size=batch_size)
    return embedder(images)


def embed_texts(
    model: nn.Module, texts: Sequence[str], *, normalize: bool = False, batch_size: int = 64
) -> np.ndarray:
    """Text embeddings (N, projection_dim) float32 of strings, from a LiT model's text tower.

    The strings are tokenized with ``model.tokenizer`` (the checkpoint's own tokenizer).
    """
    if model.args.model_type != "aim_v2_lit":
        raise ValueError(
            f"model type {model.args.model_type!r} has no text tower; use a LiT model "
            "(aimv2-large-patch14-224-lit)"
        )
    tokenizer = model_tokenizer(model)
    out = [np.zeros((0, model.args.projection_dim), np.float32)]
    for i in range(0, len(texts), batch_size):
        vectors = model.encode_text(tokenizer(texts[i : i + batch_size])).astype(mx.float32)
        out.append(np.asarray(l2_normalize(vectors) if normalize else vectors))
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# output files


def output_format(path: str | os.PathLike) -> str:
    """The output format of ``path`` from its suffix (``.npy``, ``.safetensors``, ``.jsonl``)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(
            f"{path}: unknown output format {suffix or '(no suffix)'!r}; use {', '.join(FORMATS)}"
        )
    return suffix


def paths_file(path: str | os.PathLike) -> Path:
    """The list of source paths written beside a ``.npy`` file (``out.npy`` -> ``out.paths.txt``)."""
    path = Path(path)
    return path.with_name(path.stem + PATHS_SUFFIX)


def output_files(path: str | os.PathLike) -> list[Path]:
    """Every file :func:`save_embeddings` writes for ``path`` (``.npy`` comes with its list)."""
    path = Path(path)
    return [paths_file(path), path] if output_format(path) == ".npy" else [path]


def check_sources(path: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> None:
    """Refuse source paths that ``path``'s format cannot record (a line break in a ``.npy``'s
    path list); call it before embedding anything."""
    if output_format(path) != ".npy":
        return
    broken = next((str(s) for s in sources if "\n" in str(s)), None)
    if broken is not None:
        raise InputError(
            f"{broken!r} has a line break, which {paths_file(path)} cannot list; write "
            ".safetensors or .jsonl instead"
        )


def save_embeddings(
    path: str | os.PathLike, embeddings: Embeddings, paths: Sequence[str]
) -> list[Path]:
    """Write embeddings and their source paths (same order) atomically; returns the files.

    - ``.npy``: the (B, ...) float32 array, plus ``<stem>.paths.txt`` (one path a line, the
      file-system bytes of each name kept as they are);
    - ``.safetensors``: tensor ``embeddings``, the paths as JSON in the metadata key ``paths``;
    - ``.jsonl``: one ``{"path": ..., "embedding": [...]}`` object a line (the only format for
      embeddings of different shapes, e.g. native-resolution tokens).

    Every file appears complete or not at all (paired files are replaced together), with the
    user's umask; a failure to write is an :class:`~mlx_aim.errors.OutputError`.
    """
    path = Path(path)
    fmt = output_format(path)
    paths = [str(p) for p in paths]
    if len(paths) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings but {len(paths)} paths")
    if isinstance(embeddings, list) and fmt != ".jsonl":
        raise InputError(
            f"{path}: the embeddings differ in shape between images (native-resolution tokens); "
            "write them as .jsonl"
        )
    check_sources(path, paths)
    files = output_files(path)
    with atomic_paths(*files) as temporary:
        if fmt == ".npy":
            listing = "".join(p + "\n" for p in paths)
            temporary[0].write_text(listing, encoding="utf-8", errors="surrogateescape")
            with open(temporary[1], "wb") as f:
                np.save(f, np.asarray(embeddings, np.float32))
        elif fmt == ".safetensors":
            with open(temporary[0], "wb") as f:
                mx.save_safetensors(
                    f,
                    {"embeddings": mx.array(np.asarray(embeddings, np.float32))},
                    metadata={"format": "mlx-aim-embeddings", "paths": json.dumps(paths)},
                )
        else:
            with open(temporary[0], "w", encoding="utf-8") as f:
                for p, e in zip(paths, embeddings, strict=True):
                    f.write(json.dumps({"path": p, "embedding": np.asarray(e).tolist()}) + "\n")
    return files


def load_embeddings(path: str | os.PathLike) -> tuple[Embeddings, list[str]]:
    """Read a file written by :func:`save_embeddings`: ``(embeddings, paths)``."""
    path = Path(path)
    fmt = output_format(path)
    if fmt == ".npy":
        listing = paths_file(path).read_text(encoding="utf-8", errors="surrogateescape")
        return np.load(path), listing.split("\n")[:-1]
    if fmt == ".safetensors":
        tensors, metadata = mx.load(str(path), return_metadata=True)
        return np.asarray(tensors["embeddings"]), json.loads(metadata["paths"])
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    arrays = [np.asarray(r["embedding"], np.float32) for r in rows]
    return _stack(arrays), [r["path"] for r in rows]
