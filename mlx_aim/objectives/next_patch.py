"""The AIMv1 pre-training objective: next-patch regression of normalized pixels after a prefix.

Choices where the paper is silent (arXiv 2401.08541 §4.1–4.2), each tested in tests/test_objective.py:

- Targets are the model's normalized input image cut into patches (raster order, pixels in
  (row, col, channel) order), each patch normalized by its own mean and *unbiased* variance with
  eps 1e-6, exactly as MAE's ``norm_pix_loss``.
- The prediction at position k is compared with patch k + 1; the error of a target is the mean squared
  error over its p*p*C values.
- Only targets outside the prefix (index t >= S_b) count, and the loss is their mean over the whole
  batch (every valid (image, patch) pair weighs the same).
- The prefix length S_b is drawn uniformly from {1, ..., K-1} per image.

``Variant`` switches to the alternatives of the paper's ablations (§5.2, Table 3): raw-pixel
targets, plain causal attention and other patch orders (``patch_order``). Causal attention is a
prefix of length 0: the loss reads every prediction of a next patch, K - 1 per image; the first
patch is context only (no token precedes it, so nothing predicts it). In another order the
sequence is the patch tokens permuted after their positions were added (each patch keeps its
position), the mask is applied to the permuted sequence, and the prediction at step t is paired
with the patch at step t + 1 of that order.

Training draws the prefix lengths in antithetic pairs by default (``sample_paired_prefix_lengths``):
images 2i and 2i + 1 get S and K - S. Each image's prefix length is still uniform on {1, ..., K-1},
and a pair predicts exactly K patches between them, which lets the training step run the pixel head
on a fixed ceil(B / 2) * K positions (``train.step``). Both it and ``next_patch_loss`` reduce with
``mean_patch_error``, the one place the loss is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..models.layers import patchify

PIXEL_EPS = 1e-6
TARGETS = ("norm-pixels", "pixels")
ATTENTIONS = ("prefix", "causal")


def normalize_patches(patches: mx.array, eps: float = PIXEL_EPS) -> mx.array:
    """Normalize each patch (last axis) by its mean and unbiased variance (MAE ``norm_pix_loss``)."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) * mx.rsqrt(var + eps)


def sample_prefix_lengths(
    batch_size: int, num_patches: int, key: mx.array | None = None
) -> mx.array:
    """Prefix lengths S ~ Uniform{1, ..., K-1}, one per image, as int32 (B,)."""
    if num_patches < 2:
        raise ValueError(f"next-patch prediction needs at least 2 patches, got {num_patches}")
    return mx.random.randint(1, num_patches, (batch_size,), dtype=mx.int32, key=key)


def sample_paired_prefix_lengths(
    batch_size: int, num_patches: int, key: mx.array | None = None
) -> mx.array:
    """Prefix lengths in antithetic pairs, int32 (B,): images 2i and 2i + 1 get S_i and K - S_i
    with S_i ~ Uniform{1, ..., K-1} (an odd last image keeps its S), so every image's length is
    uniform on {1, ..., K-1} and each pair predicts exactly K patches."""
    half = sample_prefix_lengths((batch_size + 1) // 2, num_patches, key=key)
    return mx.stack([half, num_patches - half], axis=1).reshape(-1)[:batch_size]


def next_patch_targets(images: mx.array, patch_size: int) -> mx.array:
    """Normalized pixel targets (B, K, p*p*C) of NHWC images."""
    return normalize_patches(patchify(images.astype(mx.float32), patch_size))


@dataclass(frozen=True)
class Variant:
    """Which AIMv1 objective: the defaults are the paper's choices, the others its ablations.

    Attributes:
        target: ``norm-pixels`` (each patch normalized by its own mean and variance) or
            ``pixels`` (the patches of the model's input as they are).
        attention: ``prefix`` (a random bidirectional prefix) or ``causal`` (no prefix).
        order: the prediction order, a permutation of the raster patch indices
            (``patch_order``); None for raster order, which permutes nothing.
    """

    target: str = "norm-pixels"
    attention: str = "prefix"
    order: tuple[int, ...] | None = None

    @property
    def causal(self) -> bool:
        return self.attention == "causal"

    def order_index(self) -> mx.array | None:
        """The order as an int32 index (K,), or None for raster order."""
        return None if self.order is None else mx.array(self.order, dtype=mx.int32)

    def targets(self, images: mx.array, patch_size: int) -> mx.array:
        """The patches (B, K, p*p*C) the model predicts, in float32 and in prediction order."""
        if self.target == "pixels":
            patches = patchify(images.astype(mx.float32), patch_size)
        else:
            patches = next_patch_targets(images, patch_size)
        order = self.order_index()
        return patches if order is None else patches[:, order]

    def prefix_lengths(
        self, batch_size: int, num_patches: int, *, paired: bool, key: mx.array | None = None
    ) -> mx.array:
        """Prefix lengths int32 (B,): 0 for causal attention, else sampled (paired or not)."""
        if self.causal:
            return mx.zeros((batch_size,), dtype=mx.int32)
        sample = sample_paired_prefix_lengths if paired else sample_prefix_lengths
        return sample(batch_size, num_patches, key=key)


PAPER_VARIANT = Variant()  # normalized pixels, prefix attention, raster order


def predicted_patches(prefix_lengths: mx.array, num_patches: int) -> mx.array:
    """How many targets the loss reads per image (K - max(S, 1): patch 0 is never predicted)."""
    return num_patches - mx.maximum(prefix_lengths, 1)


def mean_patch_error(predictions: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    """The weighted mean over patches of each patch's mean squared error, in float32.

    ``predictions`` and ``targets`` (..., p*p*C) pair each prediction with the patch it predicts;
    ``weights`` (...) is 1 where the loss reads a pair and 0 elsewhere.
    """
    errors = mx.square(predictions.astype(mx.float32) - targets).mean(axis=-1)
    return (errors * weights).sum() / weights.sum()


def next_patch_loss(
    predictions: mx.array,
    images: mx.array,
    prefix_lengths: mx.array,
    patch_size: int,
    variant: Variant = PAPER_VARIANT,
) -> mx.array:
    """Mean squared error of next-patch predictions over the non-prefix targets.

    Args:
        predictions: (B, K, p*p*C) in prediction order; ``predictions[:, k]`` predicts the
            patch at step k + 1.
        images: the normalized NHWC input images (B, H, W, C).
        prefix_lengths: int (B,), each in [1, K-1] (0: causal attention, every target counts).
        patch_size: p.
        variant: the targets and the order (default: the paper's).
    """
    targets = variant.targets(images, patch_size)[:, 1:]
    target_index = mx.arange(1, targets.shape[1] + 1)
    weights = (target_index[None, :] >= prefix_lengths[:, None]).astype(mx.float32)
    return mean_patch_error(predictions[:, :-1], targets, weights)
