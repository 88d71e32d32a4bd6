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

Training draws the prefix lengths in antithetic pairs by default (``sample_paired_prefix_lengths``):
images 2i and 2i + 1 get S and K - S. Each image's prefix length is still uniform on {1, ..., K-1},
and a pair predicts exactly K patches between them, which lets the training step run the pixel head
on a fixed ceil(B / 2) * K positions (``train.step``). Both it and ``next_patch_loss`` reduce with
``mean_patch_error``, the one place the loss is computed.
"""

from __future__ import annotations

import mlx.core as mx

from .models.layers import patchify

PIXEL_EPS = 1e-6


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


def mean_patch_error(predictions: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    """The weighted mean over patches of each patch's mean squared error, in float32.

    ``predictions`` and ``targets`` (..., p*p*C) pair each prediction with the patch it predicts;
    ``weights`` (...) is 1 where the loss reads a pair and 0 elsewhere.
    """
    errors = mx.square(predictions.astype(mx.float32) - targets).mean(axis=-1)
    return (errors * weights).sum() / weights.sum()


def next_patch_loss(
    predictions: mx.array, images: mx.array, prefix_lengths: mx.array, patch_size: int
) -> mx.array:
    """Mean squared error of next-patch predictions over the non-prefix targets.

    Args:
        predictions: (B, K, p*p*C); ``predictions[:, k]`` predicts patch k + 1.
        images: the normalized NHWC input images (B, H, W, C).
        prefix_lengths: int (B,), each in [1, K-1].
        patch_size: p.
    """
    targets = next_patch_targets(images, patch_size)[:, 1:]
    target_index = mx.arange(1, targets.shape[1] + 1)
    weights = (target_index[None, :] >= prefix_lengths[:, None]).astype(mx.float32)
    return mean_patch_error(predictions[:, :-1], targets, weights)
