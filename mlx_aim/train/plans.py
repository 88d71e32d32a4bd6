"""What each pre-training objective brings to a run: its model, data, step and evaluators.

A run (``run.py``) asks :func:`plan_for` for the :class:`ObjectivePlan` of ``--objective`` and
assembles the loop from it; the loop (``loop.py``) only sees what the plan built. A new objective
(for example LiT: a frozen trunk and a contrastive loss on cached features) is one more subclass
that overrides what differs (its model, loader, micro-batch inputs, step, evaluators) and one more
entry in :data:`PLANS`. What the loop needs of them: a loader that iterates over batch dicts (a
generator, closed when the loop ends) and has ``state()`` (``{"epoch", "cursor"}``, checkpointed);
``inputs(batch)``, the step's input of one batch; a step that returns (loss, gradient norm, *loss
parts); a validation with ``enabled``, ``subset``, ``parts`` and ``evaluate(model)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..data.loader import ImageLoader
from ..data.transforms import Preprocessing, TrainTransform
from ..errors import InputError
from ..models import build_model
from ..text.caption_bpe import TOKENIZER_FILE
from .config import TrainConfig, objective_label, objective_variant
from .distributed import World, gather_ints, on_every_rank
from .evaluation import PREVIEWS, Previews, Validation
from .inputs import (
    Images,
    SkippedFiles,
    evaluation_preprocess,
    find_training_images,
    fixed_subset,
    resolve_model,
)
from .multimodal import CaptionInputs, CaptionValidation, prepare_captions
from .multimodal_step import make_multimodal_train_step
from .step import make_train_step

# A compiled optimizer step: micro-batch inputs -> (loss, gradient norm, *loss parts).
TrainStep = Callable[[list[Any]], tuple[mx.array, ...]]


class ObjectivePlan:
    """AIMv1 next-patch prediction from the trunk; the base every other objective refines."""

    def __init__(self, config: TrainConfig, world: World):
        self.config, self.world = config, world
        self.model_config, self.preprocessing = resolve_model(config)
        self.images = Images([], [], "", [])  # until find_images()

    def find_images(self) -> Images:
        """Find the training and validation images (after the model is built: the order of a
        run's random draws stays the same)."""
        self.images = on_every_rank(lambda: find_training_images(self.config), self.world)
        return self.images

    def build_model(self) -> nn.Module:
        """The pre-training model (trunk and objective head)."""
        model = build_model(self.model_config)
        model.set_grad_checkpoint(self.config.grad_checkpoint)
        return model

    def save_files(self, output: Path) -> None:
        """Write the files the exported trunk needs besides its weights (rank 0)."""

    def loader(self, encoder: Any, starts: list[dict | None], skipped: SkippedFiles) -> ImageLoader:
        """This rank's shuffled, augmented share of every global batch."""
        config, world, images = self.config, self.world, self.images
        transform = TrainTransform(
            encoder.image_size,
            self.preprocessing.mean,
            self.preprocessing.std,
            scale=(config.min_crop_scale, 1.0),
            hflip=config.hflip,
        )
        try:
            return ImageLoader(
                images.train,
                transform,
                config.batch_size // world.size,
                seed=config.seed,
                rank=world.rank,
                world_size=world.size,
                num_workers=config.workers,
                on_error=skipped,
                start=starts[world.rank],
                **self._paired(),
            )
        except ValueError as e:
            raise InputError(f"--data {images.description}: {e}") from None

    def _paired(self) -> dict[str, Any]:
        """Extra ImageLoader arguments (labels and opener of paired data)."""
        return {}

    def inputs(self, batch: dict[str, Any]) -> Any:
        """The train step's input of one loader batch."""
        return mx.array(batch["images"])

    def train_step(self, model: nn.Module, optimizer: Any) -> TrainStep:
        """The compiled optimizer step of this rank (``step.make_train_step``)."""
        config, world = self.config, self.world
        return make_train_step(
            model,
            optimizer,
            global_batch=config.batch_size,
            rank=world.rank,
            world_size=world.size,
            grad_clip=config.grad_clip,
            compute_dtype=self.compute_dtype,
            paired_prefixes=config.paired_prefixes,
            variant=objective_variant(config, model.encoder.args),
        )

    @property
    def compute_dtype(self) -> mx.Dtype:
        return mx.bfloat16 if self.config.dtype == "bfloat16" else mx.float32

    def evaluators(
        self, encoder: Any, skipped: SkippedFiles
    ) -> tuple[Validation | CaptionValidation, Previews | None]:
        """The validation loss on a fixed subset and the previews (rank 0, when asked for)."""
        config = self.config
        evaluation = evaluation_preprocess(self.preprocessing, encoder)
        val_subset = fixed_subset(self.images.val, config.val_images, config.seed)
        validation = self._validation(val_subset, evaluation, encoder, skipped)
        previews = None
        if self.world.is_main and config.preview_every:
            previews = Previews(
                val_subset or self.images.train,
                evaluation,
                encoder,
                config.preview_images,
                config.output_dir / PREVIEWS,
                f"{config.model_name} ({objective_label(config)})",
                objective_variant(config, encoder),
                **self._preview_captions(evaluation),
            )
        return validation, previews

    def _validation(
        self, subset: list[Path], evaluation: Preprocessing, encoder: Any, skipped: SkippedFiles
    ) -> Validation | CaptionValidation:
        config, world = self.config, self.world
        return Validation(
            subset,
            evaluation,
            encoder.num_patches,
            config.batch_size // world.size,
            seed=config.seed,
            world=world,
            workers=config.workers,
            on_error=skipped,
            variant=objective_variant(config, encoder),
        )

    def _preview_captions(self, evaluation: Preprocessing) -> dict[str, Any]:
        """Extra Previews arguments (captions shown beside the images)."""
        return {}


class AimV2Plan(ObjectivePlan):
    """The AIMv2 multimodal objective on image-caption pairs (``--objective aimv2``)."""

    def __init__(self, config: TrainConfig, world: World):
        self.config, self.world = config, world
        self.captions: CaptionInputs = on_every_rank(
            lambda: prepare_captions(config, config.output_dir), world
        )
        _check_same_tokenizer(self.captions, world)
        self.model_config = self.captions.model_config
        self.preprocessing = self.captions.preprocessing
        self.images = self.captions.images

    def find_images(self) -> Images:
        return self.images

    def save_files(self, output: Path) -> None:
        self.captions.tokenizer.save(output / TOKENIZER_FILE)

    def _paired(self) -> dict[str, Any]:
        return {"labels": self.captions.train_sequences, "opener": self.captions.open_image}

    def inputs(self, batch: dict[str, Any]) -> Any:
        return mx.array(batch["images"]), mx.array(batch["labels"])

    def train_step(self, model: nn.Module, optimizer: Any) -> TrainStep:
        config, world = self.config, self.world
        return make_multimodal_train_step(
            model,
            optimizer,
            pad=self.captions.tokenizer.pad,
            rank=world.rank,
            world_size=world.size,
            alpha=config.alpha,
            grad_clip=config.grad_clip,
            compute_dtype=self.compute_dtype,
        )

    def _validation(
        self, subset: list[Path], evaluation: Preprocessing, encoder: Any, skipped: SkippedFiles
    ) -> CaptionValidation:
        config, world = self.config, self.world
        return CaptionValidation(
            self.captions,
            config.val_images,
            evaluation,
            config.batch_size // world.size,
            seed=config.seed,
            alpha=config.alpha,
            world=world,
            workers=config.workers,
            on_error=skipped,
        )

    def _preview_captions(self, evaluation: Preprocessing) -> dict[str, Any]:
        """The arguments that make AIMv2 previews show greedy captions next to the true ones."""
        from ..tasks.caption import Captioner  # it reads checkpoints: mlx_aim.train comes first

        captions = self.captions

        def describe(model: nn.Module, images: mx.array) -> list[str]:
            return Captioner(model, captions.tokenizer, evaluation).generate(images)

        return {
            "opener": captions.open_image,
            "describe": describe,
            "truth": lambda path: captions.captions.get(path, ""),
        }


def _check_same_tokenizer(captions: CaptionInputs, world: World) -> None:
    """Refuse a run whose ranks built different caption tokenizers (they would train apart)."""
    digest = hashlib.sha256(captions.tokenizer.tokenizer.to_str().encode()).digest()
    fingerprints = gather_ints([int.from_bytes(digest[i : i + 3], "big") for i in (0, 3)], world)
    if any(f != fingerprints[0] for f in fingerprints):
        raise InputError(
            "the processes built different caption tokenizers; give every machine the same "
            "--data, or the same --tokenizer"
        )


# ``--objective`` -> the plan of its runs (``config.OBJECTIVES`` lists the same names).
PLANS: dict[str, type[ObjectivePlan]] = {"aimv1": ObjectivePlan, "aimv2": AimV2Plan}


def plan_for(config: TrainConfig, world: World) -> ObjectivePlan:
    """The plan of ``config.objective``, with its model config and data resolved."""
    return PLANS[config.objective](config, world)
