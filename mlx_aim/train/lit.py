"""What ``mlx-aim train --objective lit`` adds to a run: LiT (locked-image text tuning).

- The trunk (``--model``: anything ``mlx_aim.load`` reads whose image tower is an AIMv2 trunk: a
  training run's folder, a converted release, a registry name; an architecture name without
  weights, e.g. ``aimv2-nano``, gives a random trunk) is frozen inside an ``aim_v2_lit`` model
  (the released ml-aim ``AIMv2LiT`` layout); trained are the attention-pool head, both
  projections, the text tower and the logit scale (``lit_step.py``).
- Data: the caption sources of ``--objective aimv2`` (``multimodal.find_caption_data``).
- Tokenizer: the run directory's ``tokenizer.json`` when resuming, else the CLIP tokenizer of
  ``--text-init``, else a CLIP-pipeline byte-level BPE of ``--vocab-size`` trained on the training
  captions; it is saved in the run, so the exported folder loads like the released LiT model.
- Feature cache: the trunk's final-norm tokens (N, D) of every training and validation image,
  computed once with the trunk's evaluation preprocessing (no augmentation) and stored as float16
  in ``tasks.features.FeatureCache`` (a memory-mapped ``.npy`` keyed by the trunk's weights, the
  files and the preprocessing), so RAM holds only the batches being read. When the cache folder
  lacks the disk space, or with ``--no-feature-cache``, the trunk runs in every step instead.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import signal
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..checkpoints.registry import REGISTRY
from ..data.images import ImageError
from ..data.loader import ImageLoader
from ..errors import InputError, Interrupted, MlxAimError
from ..io import check_not_reading
from ..models import build_model, build_model_args
from ..models.base import ConfigError
from ..tasks.features import (
    BatchRunner,
    FeatureCache,
    compute_feature_set,
    crop_transform,
    items_fingerprint,
    model_fingerprint,
)
from ..text.clip_tokenizer import FULL_FILE, Tokenizer, load_tokenizer, train_clip_bpe
from .config import TrainConfig
from .distributed import World, gather_ints, on_every_rank
from .inputs import Images, SkippedFiles
from .lit_step import LitValidation, make_lit_train_step
from .multimodal import CaptionData, find_caption_data
from .plans import ObjectivePlan, TrainStep
from .stopping import StopSignals

_RUNNER_BATCH = 64


class LitPlan(ObjectivePlan):
    """LiT on a frozen AIMv2 trunk (see the module docstring)."""

    part_names = ("accuracy",)
    loss_title = "contrastive loss and in-batch accuracy"

    def __init__(self, config: TrainConfig, world: World, stop: StopSignals | None = None):
        self.config, self.world, self.stop = config, world, stop
        check_not_reading(config.output_dir, [p for p in (config.model, config.text_init) if p])
        self.trunk_model = on_every_rank(lambda: _load_trunk(config), world)
        self.text_init = on_every_rank(lambda: _load_text_init(config), world)
        self.data: CaptionData = on_every_rank(lambda: find_caption_data(config), world)
        self.tokenizer = on_every_rank(lambda: self._tokenizer(), world)
        _check_same_tokenizer(self.tokenizer, world)
        self.model_config = self._model_config()
        self.preprocessing = self.trunk_model.preprocessing
        self.images = self.data.images
        self.log_lines: list[str] = []
        self.features = on_every_rank(self._features, world)

    # ---- inputs ----------------------------------------------------------------------------

    def _tokenizer(self) -> Tokenizer:
        config, length = self.config, self._context_length()
        saved = config.output_dir / FULL_FILE
        try:
            if saved.is_file():  # a resumed run keeps its tokenizer
                return load_tokenizer(config.output_dir, length)
            if self.text_init is not None:
                return self.text_init.tokenizer
            return train_clip_bpe([c for _, c in self.data.train], config.vocab_size, length)
        except (ImportError, ValueError) as e:
            raise InputError(f"tokenizer: {e}") from None

    def _context_length(self) -> int:
        if self.text_init is not None:
            return self.text_init.args.max_context_length
        return self.config.context_length

    def _model_config(self) -> dict[str, Any]:
        config, vision = self.config, {**self.trunk_model.args.to_dict(), "num_classes": 0}
        if self.text_init is not None:
            text = self.text_init.args.to_dict()
            text.pop("vision")
            return {**text, "vision": vision}
        model_config = {
            "model_type": "aim_v2_lit",
            "vision": vision,
            "text_embed_dim": config.text_width,
            "text_num_blocks": config.text_depth,
            "text_num_heads": config.text_heads,
            "text_mlp_hidden_dim": 64 * math.ceil(config.text_width * 8 / 3 / 64),
            "vocab_size": self.tokenizer.vocab_size,
            "max_context_length": config.context_length,
            "eos_token_id": self.tokenizer.eos_id,
            "projection_dim": config.projection_dim,
        }
        try:
            build_model_args(model_config)
        except ConfigError as e:
            raise InputError(f"--objective lit: {e}") from None
        return model_config

    def _ids(self, items: list[tuple[Path, str]]) -> np.ndarray:
        """Token ids (N, context length) of the captions, padded with the pad id."""
        length = self._context_length()
        rows = self.tokenizer.encode([c for _, c in items])
        pad = self.tokenizer.pad_id
        return np.array([r + [pad] * (length - len(r)) for r in rows], np.int32).reshape(-1, length)

    def _features(self) -> dict[str, Any] | None:
        """The cached trunk tokens of every image (None: the trunk runs in each step)."""
        if not self.config.feature_cache:
            return None
        trunk = self.trunk_model
        items = [(p, i) for i, (p, _) in enumerate(self.data.train + self.data.val)]
        cache = FeatureCache()
        prep = self.preprocessing
        key = cache.key("lit-tokens", model_fingerprint(trunk), items_fingerprint(items), prep)
        args = trunk.args
        needed = len(items) * args.num_patches * args.embed_dim * 2
        cache.root.mkdir(parents=True, exist_ok=True)
        if cache.load(key) is None and shutil.disk_usage(cache.root).free < 2 * needed:
            self.log_lines.append(
                f"feature cache: {needed / 1e9:.2f} GB needed in {cache.root}, not free; the trunk "
                "runs in every step (set MLX_AIM_CACHE to a larger disk to cache)"
            )
            return None
        runner = BatchRunner(trunk.encode, _RUNNER_BATCH, state=trunk.state)
        transform = crop_transform(prep, args.model_type)
        entry, hit = cache.get_or_compute(
            key,
            lambda out: compute_feature_set(
                runner,
                items,
                transform,
                out_file=out,
                num_workers=self.config.workers,
                opener=self.data.found.open_image,
                progress=self._check_stop,
            ),
        )
        self.log_lines.append(
            f"feature cache: trunk tokens of {len(entry)} images ({args.num_patches} x "
            f"{args.embed_dim} each, {entry.features.nbytes / 1e6:.1f} MB) "
            f"{'read from' if hit else 'written to'} {cache.root / key}.npy"
        )
        rows = {Path(p): i for i, p in enumerate(entry.paths)}
        train = [(p, c) for p, c in self.data.train if p in rows]
        val = [(p, c) for p, c in self.data.val if p in rows]
        reasons = {}
        for error in entry.errors:  # "path: reason" of each image the trunk could not read
            path = next((str(p) for p, _ in items if error.startswith(f"{p}: ")), None)
            reasons[path] = error[len(f"{path}: ") :] if path else error
        errors = [
            ImageError(p, reasons.get(str(p), "unreadable image"))
            for p, _ in self.data.train + self.data.val
            if p not in rows
        ]
        return {
            "tokens": entry.features,
            "rows": rows,
            "train": train,
            "val": val,
            "errors": errors,
        }

    def _check_stop(self, done: int = 0) -> None:
        """Stop the feature extraction at once on Ctrl-C / SIGTERM (nothing is trained yet)."""
        if self.stop is not None and self.stop.requested is not None:
            name = signal.Signals(self.stop.requested).name
            raise Interrupted(
                f"interrupted by {name} while caching the trunk's outputs, before any training "
                "step; run the same command to start again",
                self.stop.requested,
            )

    # ---- the plan --------------------------------------------------------------------------

    def find_images(self) -> Images:
        if self.features is None:
            return self.images
        train, val = self.features["train"], self.features["val"]  # the readable images
        errors = [*self.data.skipped, *self.features["errors"]]
        return Images([p for p, _ in train], [p for p, _ in val], self.data.description, errors)

    def build_model(self) -> nn.Module:
        """The LiT model: the trunk's weights in its image tower, frozen; the rest trained."""
        model = build_model(self.model_config)
        trunk = dict(tree_flatten(self.trunk_model.parameters()))
        model.image_encoder.load_weights(list(trunk.items()), strict=False)
        if self.text_init is not None:
            own = dict(tree_flatten(model.parameters()))
            start = [
                (k, v)
                for k, v in tree_flatten(self.text_init.parameters())
                if (not k.startswith("image_encoder.") or k.startswith("image_encoder.head."))
                and k in own
                and own[k].shape == v.shape
            ]
            model.load_weights(start, strict=False)
        model.image_encoder.freeze()
        model.image_encoder.head.unfreeze()
        mx.eval(model.parameters())
        return model

    def trunk(self, model: nn.Module) -> nn.Module:
        return model.image_encoder

    def exported(self, model: nn.Module) -> nn.Module:
        return model

    def save_files(self, output: Path) -> None:
        self.tokenizer.save(output)

    def loader(self, encoder: Any, starts: list[dict | None], skipped: SkippedFiles) -> ImageLoader:
        """Shuffled batches of cached tokens (or of images when the trunk runs in each step)."""
        config, world = self.config, self.world
        if self.features is not None:
            train = self.features["train"]
            tokens, rows = self.features["tokens"], self.features["rows"]
            paths, opener = [p for p, _ in train], rows.__getitem__
            transform = lambda row, rng: tokens[row]  # noqa: E731
        else:
            train = self.data.train
            paths, opener = [p for p, _ in train], self.data.found.open_image
            transform = crop_transform(self.preprocessing, "aim_v2")
        try:
            return ImageLoader(
                paths,
                transform,
                config.batch_size // world.size,
                seed=config.seed,
                rank=world.rank,
                world_size=world.size,
                num_workers=0 if self.features is not None else config.workers,
                on_error=skipped,
                start=starts[world.rank],
                labels=self._ids(train),
                opener=opener,
            )
        except ValueError as e:
            raise InputError(f"--data {self.data.description}: {e}") from None

    def inputs(self, batch: dict[str, Any]) -> Any:
        data = mx.array(batch["images"])
        if self.features is None:
            data = mx.stop_gradient(self._runner()(data))
        return data, mx.array(batch["labels"])

    def _runner(self) -> BatchRunner:
        if getattr(self, "_trunk_runner", None) is None:
            trunk = self.trunk_model
            self._trunk_runner = BatchRunner(
                trunk.encode, self.config.batch_size // self.world.size, state=trunk.state
            )
        return self._trunk_runner

    def train_step(self, model: nn.Module, optimizer: Any) -> TrainStep:
        config = self.config
        return make_lit_train_step(
            model, optimizer, world_size=self.world.size, grad_clip=config.grad_clip
        )

    def evaluators(self, encoder: Any, skipped: SkippedFiles) -> tuple[LitValidation, None]:
        """The validation loss and accuracy on a fixed subset; LiT has no previews."""
        config = self.config
        if self.features is not None:
            val = self.features["val"]
            rows = [self.features["rows"][p] for p, _ in val]
            tokens = self.features["tokens"][rows] if rows else np.zeros((0,), np.float16)
        else:
            val = self.data.val
            tokens = _trunk_tokens(self, [p for p, _ in val], skipped)
        return LitValidation(tokens, self._ids(val), config.val_images, config.seed), None


def _trunk_tokens(plan: LitPlan, paths: list[Path], skipped: SkippedFiles) -> np.ndarray:
    """The trunk tokens of images, computed now (no cache)."""
    if not paths:
        return np.zeros((0,), np.float16)
    trunk = plan.trunk_model
    runner = BatchRunner(trunk.encode, _RUNNER_BATCH, state=trunk.state)
    found = compute_feature_set(
        runner,
        [(p, i) for i, p in enumerate(paths)],
        crop_transform(plan.preprocessing, "aim_v2"),
        on_error=skipped,
        opener=plan.data.found.open_image,
    )
    return found.features


def _load_trunk(config: TrainConfig) -> nn.Module:
    """The frozen trunk of ``--model`` (a random one for an architecture without weights)."""
    import mlx_aim

    from ..tasks.features import vision_model

    entry = REGISTRY.get(config.model)
    try:
        if entry is not None and entry.checkpoint is None:
            mx.random.seed(config.seed)  # the same random trunk on every rank and every resume
            model = build_model(entry.config)
            model.preprocessing = entry.preprocessing
        else:
            model = mlx_aim.load(config.model)
    except MlxAimError as e:
        raise InputError(f"--model {config.model}: {e}") from None
    trunk = vision_model(model)
    if trunk.args.model_type != "aim_v2":
        raise InputError(
            f"--model {config.model}: model type {trunk.args.model_type!r}; LiT trains against an "
            "AIMv2 trunk (aim_v2)"
        )
    trunk.preprocessing = model.preprocessing
    trunk.eval()
    return trunk


def _load_text_init(config: TrainConfig) -> nn.Module | None:
    """The LiT model of ``--text-init``, with its tokenizer, or None."""
    if config.text_init is None:
        return None
    import mlx_aim

    try:
        model = mlx_aim.load(config.text_init)
    except MlxAimError as e:
        raise InputError(f"--text-init {config.text_init}: {e}") from None
    if model.args.model_type != "aim_v2_lit":
        raise InputError(f"--text-init {config.text_init}: not a LiT model")
    if model.tokenizer is None:
        raise InputError(
            f"--text-init {config.text_init}: no tokenizer files beside the weights (or the "
            "'tokenizers' package is missing: pip install 'mlx-aim[text]')"
        )
    return model


def _check_same_tokenizer(tokenizer: Tokenizer, world: World) -> None:
    """Refuse a run whose ranks built different tokenizers (they would train apart)."""
    digest = hashlib.sha256(tokenizer.backend.to_str().encode()).digest()
    fingerprints = gather_ints([int.from_bytes(digest[i : i + 3], "big") for i in (0, 3)], world)
    if any(f != fingerprints[0] for f in fingerprints):
        raise InputError(
            "the processes built different tokenizers; give every machine the same --data"
        )
