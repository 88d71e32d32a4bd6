"""Evaluation during a run: the validation loss on a fixed subset and prediction previews.

Both use fixed images and fixed prefix lengths (drawn from the run's seed, never from MLX's
global random state), so they are comparable across steps and do not change the training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from ..data.images import ImageError, open_image
from ..data.loader import ImageLoader
from ..objectives.next_patch import PAPER_VARIANT, Variant, next_patch_loss, predicted_patches
from .distributed import World
from .report import preview_image, save_png

PREVIEWS = "previews"
_PREFIX_SEED, _PREVIEW_COUNT_MAX = 7, 16


class Validation:
    """The loss on a fixed validation subset with fixed prefix lengths, split over the ranks.

    The images are decoded once, here; unreadable ones go to ``on_error`` and are left out. The
    loss is the training objective's (``variant``; causal attention: no prefix).
    """

    def __init__(
        self,
        subset: list[Path],
        preprocess,
        num_patches: int,
        batch: int,
        *,
        seed: int,
        world: World,
        workers: int,
        on_error: Callable[[ImageError], None],
        variant: Variant = PAPER_VARIANT,
    ):
        self.subset = subset
        self.num_patches = num_patches
        self.batch = batch
        self.world = world
        self.variant = variant
        prefix = np.random.default_rng([seed, _PREFIX_SEED]).integers(1, num_patches, len(subset))
        if variant.causal:
            prefix[:] = 0
        mine = list(range(world.rank, len(subset), world.size))
        self.enabled = bool(subset)
        self.parts: dict[str, float] = {}  # no separate loss terms (see CaptionValidation)
        self.images = np.zeros((0,), np.float32)
        self.prefix = np.zeros((0,), np.int32)
        if mine:
            loader = ImageLoader.in_order(
                [subset[i] for i in mine],
                preprocess,
                min(64, len(mine)),
                num_workers=workers,
                on_error=on_error,
            )
            arrays, kept = [], []
            try:
                for b in loader:
                    arrays.append(b["images"])
                    kept.extend(b["indices"].tolist())
            except ValueError:
                arrays = []  # none of this rank's validation images could be read
            if arrays:
                self.images = np.concatenate(arrays)
                self.prefix = prefix[np.array(mine)[kept]].astype(np.int32)

    def evaluate(self, model: nn.Module) -> float | None:
        """The mean loss over the subset's predicted patches, the same on every rank."""
        if not self.enabled:
            return None
        total, count = mx.array(0.0), mx.array(0.0)
        patch = model.encoder.args.patch_size
        order = self.variant.order_index()
        for i in range(0, len(self.prefix), self.batch):
            x = mx.array(self.images[i : i + self.batch])
            s = mx.array(self.prefix[i : i + self.batch])
            n = predicted_patches(s, self.num_patches).sum().astype(mx.float32)
            loss = next_patch_loss(model(x, s, order), x, s, patch, self.variant)
            total = total + loss * n
            count = count + n
            mx.eval(total, count)
        sums = mx.stack([total, count])
        if self.world.size > 1:
            sums = mx.distributed.all_sum(sums)
        total, count = sums.tolist()
        if count == 0:
            return None
        return total / count


class Previews:
    """Prediction previews of ``count`` fixed images, evenly spaced in ``candidates`` (rank 0).

    Each is written to ``folder/step-NNNNNNNN.png`` under a title starting with ``title``. The
    shown prefix is the first half of the patches in the ``variant``'s order. With ``describe``
    (AIMv2 runs: ``describe(model, images)`` -> generated captions) and ``truth`` (the caption of a
    path), each row also shows the generated caption next to the true one.
    """

    def __init__(
        self,
        candidates: list[Path],
        preprocess,
        encoder,
        count: int,
        folder: Path,
        title: str,
        variant: Variant = PAPER_VARIANT,
        *,
        opener: Callable[[Path], Image.Image] = open_image,
        describe: Callable[[nn.Module, mx.array], list[str]] | None = None,
        truth: Callable[[Path], str] | None = None,
    ):
        self.encoder = encoder
        self.variant = variant
        self.folder = folder
        self.title = title
        self.prefix = encoder.num_patches // 2
        self.describe = describe
        self.truths: list[str] = []
        self.mean, self.std = preprocess.mean, preprocess.std
        self.originals, arrays = [], []
        n = min(count, _PREVIEW_COUNT_MAX)
        spread = lambda k: np.linspace(0, len(candidates) - 1, k).round().astype(int).tolist()  # noqa: E731
        for i in dict.fromkeys(spread(n) + spread(4 * n)):  # evenly spaced; spares for bad files
            if len(arrays) == n:
                break
            path = candidates[i]
            try:
                original = opener(path)
            except ImageError:
                continue
            self.originals.append(original)
            self.truths.append(truth(path) if truth is not None else "")
            arrays.append(preprocess(original))
        self.images = np.stack(arrays) if arrays else None

    def write(self, model: nn.Module, step: int) -> None:
        """Write ``folder/step-NNNNNNNN.png``."""
        if self.images is None:
            return
        x = mx.array(self.images)
        attended = 0 if self.variant.causal else self.prefix  # causal: no bidirectional prefix
        prefix = mx.full((len(self.images),), attended, dtype=mx.int32)
        order = self.variant.order_index()
        predictions = np.array(model(x, prefix, order).astype(mx.float32))
        variant = self.variant
        captions = None
        if self.describe is not None:
            generated = self.describe(model, x)
            captions = [f"{g}\ntruth: {t}" for g, t in zip(generated, self.truths, strict=True)]
        image = preview_image(
            self.images,
            predictions,
            self.prefix,
            self.encoder.patch_size,
            self.mean,
            self.std,
            self.originals,
            title=f"{self.title}  step {step}  (next-patch predictions after a "
            f"{self.prefix}-patch prefix, teacher-forced)",
            order=None if variant.order is None else np.array(variant.order),
            normalized=variant.target == "norm-pixels",
            captions=captions,
        )
        save_png(image, self.folder / f"step-{step:08d}.png")
