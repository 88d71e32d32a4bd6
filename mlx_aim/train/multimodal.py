"""What ``mlx-aim train --objective aimv2`` adds to a run (see ``loop.py`` for the run itself).

- ``prepare_captions``: the captioned training and validation data (``--data``, default the
  built-in scenes), the caption tokenizer (the run directory's ``tokenizer.json`` when resuming,
  else ``--tokenizer``, else byte-level BPE trained on the training captions with
  ``--vocab-size``) and the ``aimv2_pretrain`` model config (``--model`` an AIMv2 trunk, decoder
  flags, the tokenizer's vocabulary);
- ``CaptionValidation``: image, text and total loss on a fixed validation subset with fixed
  prefix lengths, split over the ranks.

The training loader is the ordinary ``ImageLoader`` with each image's caption sequence as its
label row (``labels=``) and ``CaptionedImages.open_image`` as opener (tar members).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..checkpoints.registry import REGISTRY, default_preprocessing, multimodal_pretrain_config
from ..data.builtin import is_builtin_name, resolve_builtin, training_splits
from ..data.captions import CaptionedImages, find_captioned_images
from ..data.images import ImageError
from ..data.loader import ImageLoader, split_paths
from ..data.transforms import Preprocessing
from ..errors import InputError
from ..io import read_json
from ..models import build_model_args
from ..models.base import ConfigError
from ..objectives.multimodal import multimodal_loss
from ..text.caption_bpe import TOKENIZER_FILE, CaptionTokenizer
from .config import TrainConfig
from .distributed import World
from .inputs import Images, fixed_subset

_PREFIX_SEED = 11


@dataclass
class CaptionInputs:
    """Everything an AIMv2 run reads before training: data, tokenizer and model config."""

    images: Images  # train / val paths (tar members as <shard>/<member>), description, skipped
    train_sequences: np.ndarray  # int32 (N_train, T+1): [BOS] caption [EOS] [PAD]...
    val_sequences: np.ndarray
    tokenizer: CaptionTokenizer
    model_config: dict[str, Any]
    preprocessing: Preprocessing
    open_image: Callable  # an ImageLoader opener reading files and tar members
    captions: dict[Path, str]  # the caption of every training and validation image
    members: dict[Path, tuple[Path, int, int]]  # tar members: (shard, offset, size)


@dataclass
class CaptionData:
    """The captioned images of a run: (path, caption) pairs of each split, and how to read them."""

    train: list[tuple[Path, str]]
    val: list[tuple[Path, str]]
    description: str
    skipped: list
    found: CaptionedImages  # opens files and tar members (``open_image``)

    @property
    def images(self) -> Images:
        train, val = [p for p, _ in self.train], [p for p, _ in self.val]
        return Images(train, val, self.description, self.skipped)


def find_caption_data(config: TrainConfig) -> CaptionData:
    """``--data`` / ``--val-data`` (default the built-in scenes), split by ``--val-fraction``
    when no validation data is given."""
    val_data = resolve_builtin(config.val_data) if config.val_data else None
    if config.data is None or is_builtin_name(config.data):
        name = str(config.data or "scenes")
        train_root, val_root = training_splits(name)
        train, description = _find(train_root, "--data"), f"built-in {name} ({train_root})"
        val = _find(val_data or val_root, "--val-data")
    else:
        train, description = _find(resolve_builtin(config.data), "--data"), str(config.data)
        val = _find(val_data, "--val-data") if val_data else None
    skipped = train.skipped + (val.skipped if val else [])
    train_items = list(zip(train.images, train.captions, strict=True))
    if val is not None:
        val_items = list(zip(val.images, val.captions, strict=True))
        train.members.update(val.members)
    elif config.val_fraction > 0:
        train_items, val_items = split_paths(train_items, config.val_fraction, config.seed)
    else:
        val_items = []
    return CaptionData(train_items, val_items, description, skipped, train)


def prepare_captions(config: TrainConfig, output: Path) -> CaptionInputs:
    """Find the captions, get the tokenizer and resolve the model (see the module docstring)."""
    data = find_caption_data(config)
    tokenizer = _tokenizer(config, output, [c for _, c in data.train])
    model_config, preprocessing = _resolve_model(config, tokenizer.vocab_size)
    length = model_config.get("max_text_tokens", 32)
    train_sequences = tokenizer.sequences([c for _, c in data.train], length)
    if len(train_sequences) and (train_sequences[:, 1] == tokenizer.eos).all():
        raise InputError(f"{tokenizer.source}: encodes every training caption to no tokens")
    return CaptionInputs(
        images=data.images,
        train_sequences=train_sequences,
        val_sequences=tokenizer.sequences([c for _, c in data.val], length),
        tokenizer=tokenizer,
        model_config=model_config,
        preprocessing=preprocessing,
        open_image=data.found.open_image,
        captions=dict(data.train + data.val),
        members=data.found.members,
    )


def _find(source, flag: str) -> CaptionedImages:
    try:
        found = find_captioned_images(source)
    except InputError as e:
        raise InputError(f"{flag}: {e}") from None
    if not found.images:
        reason = found.skipped[0] if found.skipped else "no image files"
        raise InputError(f"{flag} {source}: no captioned images ({reason})")
    return found


def _tokenizer(config: TrainConfig, output: Path, captions: list[str]) -> CaptionTokenizer:
    saved = output / TOKENIZER_FILE
    try:
        if saved.is_file():  # a resumed run keeps its tokenizer
            return CaptionTokenizer.load(saved)
        if config.tokenizer:
            return CaptionTokenizer.load(Path(config.tokenizer).expanduser())
        return CaptionTokenizer.train(captions, config.vocab_size)
    except InputError as e:
        raise InputError(str(e)) from None


def _resolve_model(config: TrainConfig, vocab_size: int) -> tuple[dict[str, Any], Preprocessing]:
    decoder = {"vocab_size": vocab_size}
    for name in ("decoder_width", "decoder_depth", "decoder_heads"):
        if getattr(config, name) is not None:
            decoder[name] = getattr(config, name)
    source = Path(config.model).expanduser()
    hint = "an AIMv2 trunk: aimv2-nano, aimv2-tiny, or an aim_v2 / aimv2_pretrain JSON config"
    try:
        if config.model in REGISTRY:
            model_config = multimodal_pretrain_config(config.model, **decoder)
            preprocessing = REGISTRY[config.model].preprocessing
        elif source.is_file() and source.suffix == ".json":
            raw = read_json(source, max_bytes=2**20)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            if raw.get("model_type") != "aimv2_pretrain":
                raw = {"model_type": "aimv2_pretrain", "encoder": raw}
            model_config = {**raw, **decoder}
            preprocessing = default_preprocessing(model_config)
        else:
            raise KeyError("not a model name or JSON config file")
        build_model_args(model_config)
    except KeyError as e:
        raise InputError(
            f"--model {config.model}: {e.args[0]}; --objective aimv2 trains {hint}"
        ) from None
    except (ConfigError, OSError, ValueError) as e:
        raise InputError(f"--model {config.model}: {e}") from None
    return model_config, preprocessing


class CaptionValidation:
    """``L_img``, ``L_text`` and their weighted sum on a fixed subset of ``size`` validation
    images, split over the ranks.

    The images are decoded once, here, with fixed prefix lengths drawn from the run's seed;
    unreadable images go to ``on_error`` and are left out. Each rank evaluates every
    ``world.size``-th image of the subset and the sums are all-reduced, so every rank gets the
    loss of the whole subset. After ``evaluate``, ``parts`` holds the image and text losses.
    """

    def __init__(
        self,
        inputs: CaptionInputs,
        size: int,
        preprocess,
        batch: int,
        *,
        seed: int,
        alpha: float,
        world: World,
        workers: int,
        on_error: Callable[[ImageError], None],
    ):
        self.batch, self.alpha, self.world = batch, alpha, world
        self.subset = fixed_subset(list(range(len(inputs.images.val))), size, seed)
        self.enabled = bool(self.subset)
        self.parts: dict[str, float] = {}
        self.pad = inputs.tokenizer.pad
        num_patches = build_model_args(inputs.model_config).encoder_args.num_patches
        rng = np.random.default_rng([seed, _PREFIX_SEED])
        prefix = rng.integers(1, num_patches, len(self.subset)).astype(np.int32)
        mine = [self.subset[i] for i in range(world.rank, len(self.subset), world.size)]
        self.images = np.zeros((0,), np.float32)
        self.sequences = inputs.val_sequences[:0]
        self.prefix = prefix[:0]
        if not mine:
            return
        loader = ImageLoader(
            [inputs.images.val[i] for i in mine],
            preprocess,
            min(64, len(mine)),
            shuffle=False,
            drop_last=False,
            epochs=1,
            num_workers=workers,
            on_error=on_error,
            labels=inputs.val_sequences[mine],
            opener=inputs.open_image,
        )
        try:
            batches = list(loader)
        except ValueError:
            batches = []  # none of this rank's validation images could be read
        if batches:
            kept = np.concatenate([b["indices"] for b in batches])
            self.images = np.concatenate([b["images"] for b in batches])
            self.sequences = np.concatenate([b["labels"] for b in batches])
            self.prefix = prefix[world.rank :: world.size][kept]

    def evaluate(self, model: nn.Module) -> float | None:
        """The total loss (image part: mean over predicted patches; text: over target tokens)."""
        if not self.enabled:
            return None
        sums = np.zeros(4)  # image error sum, predicted patches, text error sum, target tokens
        args = model.encoder.args
        for i in range(0, len(self.images), self.batch):
            x = mx.array(self.images[i : i + self.batch])
            s = mx.array(self.prefix[i : i + self.batch])
            seq = mx.array(self.sequences[i : i + self.batch])
            pixels, logits = model(x, s, seq[:, :-1])
            _, image, text = multimodal_loss(
                pixels, logits, x, s, seq[:, 1:], patch_size=args.patch_size, pad=self.pad
            )
            patches = (args.num_patches - s).sum()
            tokens = (seq[:, 1:] != self.pad).sum()
            sums += np.array(mx.stack([image * patches, patches, text * tokens, tokens]).tolist())
        if self.world.size > 1:
            sums = np.array(mx.distributed.all_sum(mx.array(sums, mx.float32)).tolist())
        if sums[1] == 0:
            return None
        image, text = sums[0] / sums[1], sums[2] / max(sums[3], 1)
        self.parts = {"image_loss": float(image), "text_loss": float(text)}
        return float(text + self.alpha * image)
