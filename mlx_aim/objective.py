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
and a pair predicts exactly K patches between them, so a batch always has ceil(B / 2) * K
predictions to make: ``packed_prediction_index`` packs their positions into that fixed shape and the
pixel head runs only there (``packed_next_patch_loss``), about half the head's work, with the same
loss and gradients as the full computation (``next_patch_loss``) for those prefix lengths.
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


def packed_prediction_index(
    prefix_lengths: mx.array, num_patches: int, first: int = 0
) -> tuple[mx.array, mx.array]:
    """Where the loss reads predictions, packed in rows of K: (flat token index, weight), each (R * K,).

    Image b (global index ``first + b``) needs the predictions at positions S_b - 1, ..., K - 2
    (targets S_b, ..., K - 1), K - S_b of them. The images of one pair (global indices 2i, 2i + 1)
    share a row, the first image's positions then the second's; an image whose partner lies outside
    this slice gets a row of its own. The flat index ``b * K + k`` addresses a (B * K, ...) view of
    the tokens; padding slots point at token 0 with weight 0.

    The lengths of a pair must sum to K, as ``sample_paired_prefix_lengths`` draws them: a shared
    row is then exactly full (larger sums would not fit; the shapes are fixed so that the step
    compiles once).
    """
    batch, k = prefix_lengths.shape[0], num_patches
    pair = [(first + b) // 2 for b in range(batch)]
    leads = [b for b in range(batch) if b == 0 or pair[b] != pair[b - 1]]
    partners = [b + 1 if b + 1 < batch and pair[b + 1] == pair[b] else -1 for b in leads]
    lead = mx.array(leads, mx.int32)[:, None]
    partner = mx.array(partners, mx.int32)[:, None]
    has_partner = partner >= 0
    partner = mx.maximum(partner, 0)
    lead_prefix = prefix_lengths[lead]
    partner_prefix = prefix_lengths[partner]
    column = mx.arange(k, dtype=mx.int32)[None]
    lead_count = k - lead_prefix
    in_lead = column < lead_count
    partner_column = column - lead_count
    in_partner = has_partner & ~in_lead & (partner_column < k - partner_prefix)
    token = mx.where(
        in_lead,
        lead * k + lead_prefix - 1 + column,
        mx.where(in_partner, partner * k + partner_prefix - 1 + partner_column, 0),
    )
    weight = (in_lead | in_partner).astype(mx.float32)
    return token.reshape(-1), weight.reshape(-1)


def next_patch_targets(images: mx.array, patch_size: int) -> mx.array:
    """Normalized pixel targets (B, K, p*p*C) of NHWC images."""
    return normalize_patches(patchify(images.astype(mx.float32), patch_size))


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
    errors = mx.square(predictions[:, :-1].astype(mx.float32) - targets).mean(axis=-1)
    target_index = mx.arange(1, targets.shape[1] + 1)
    weights = (target_index[None, :] >= prefix_lengths[:, None]).astype(mx.float32)
    return (errors * weights).sum() / weights.sum()


def packed_next_patch_loss(
    predictions: mx.array,
    images: mx.array,
    token_index: mx.array,
    weights: mx.array,
    patch_size: int,
) -> mx.array:
    """``next_patch_loss`` from predictions made only where the loss reads them.

    Args:
        predictions: (M, p*p*C), the prediction at flat token ``token_index[m]`` (``b * K + k``).
        images: the normalized NHWC input images (B, H, W, C).
        token_index, weights: from ``packed_prediction_index``.
        patch_size: p.
    """
    targets = next_patch_targets(images, patch_size)
    targets = targets.reshape(-1, targets.shape[-1])[token_index + 1]  # patch k + 1, same image
    errors = mx.square(predictions.astype(mx.float32) - targets).mean(axis=-1)
    return (errors * weights).sum() / weights.sum()
