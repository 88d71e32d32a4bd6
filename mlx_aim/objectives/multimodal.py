"""The AIMv2 pre-training objective: next-patch regression plus next-token captioning.

AIMv2 (arXiv 2411.14402 §2) minimises ``L_text + alpha * L_img`` on image-caption pairs. Choices
where the paper is ambiguous, each tested in tests/test_multimodal_objective.py:

- Prefix lengths: the text says M ~ U{1, ..., I-1}; the appendix pseudo-code draws
  ``randint(0, I-1)``, which would allow an empty prefix (a fully causal encoder). We follow the
  text and reuse AIMv1's ``objective.sample_prefix_lengths`` (uniform on {1, ..., K-1}, one per
  image, drawn independently: no antithetic pairs, since every decoder position runs anyway).
- ``L_img`` is AIMv1's ``objective.next_patch_loss``: targets are per-patch normalized pixels
  (MAE's ``norm_pix_loss``), the prediction at position k is compared with patch k + 1, only
  non-prefix targets (t >= S) count, and the loss is their mean over the batch.
- ``L_text``: each caption is tokenized as ``[BOS] caption [EOS]``, cut to ``max_text_tokens + 1``
  tokens (a cut caption loses its [EOS]) and padded with [PAD]; the decoder reads the first
  ``max_text_tokens`` ("[BOS] caption") and predicts the last ``max_text_tokens``
  ("caption [EOS]"). The loss is the cross-entropy averaged over every non-[PAD] target token of
  the batch (every token weighs the same, as in language-model training), so the [BOS] input
  predicts the caption's first token from the image alone.
- ``alpha`` = 0.4 (``IMAGE_LOSS_WEIGHT``) weighs ``L_img``; ``L_text`` has weight 1.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .next_patch import next_patch_loss

IMAGE_LOSS_WEIGHT = 0.4


def caption_sequences(
    captions: list[list[int]], max_text_tokens: int, bos: int, eos: int, pad: int
) -> np.ndarray:
    """``[BOS] ids [EOS]`` per caption, cut or [PAD]-padded to ``max_text_tokens + 1``: int32 (N, T+1)."""
    out = np.full((len(captions), max_text_tokens + 1), pad, dtype=np.int32)
    for row, ids in zip(out, captions, strict=True):
        sequence = [bos, *ids, eos][: max_text_tokens + 1]
        row[: len(sequence)] = sequence
    return out


def caption_loss(logits: mx.array, targets: mx.array, pad: int) -> mx.array:
    """Cross-entropy of logits (B, T, V) against targets (B, T), averaged over non-[PAD] targets."""
    losses = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    weights = (targets != pad).astype(mx.float32)
    return (losses * weights).sum() / mx.maximum(weights.sum(), 1.0)


def multimodal_loss(
    pixels: mx.array,
    logits: mx.array,
    images: mx.array,
    prefix_lengths: mx.array,
    targets: mx.array,
    *,
    patch_size: int,
    pad: int,
    alpha: float = IMAGE_LOSS_WEIGHT,
) -> tuple[mx.array, mx.array, mx.array]:
    """``(L_text + alpha * L_img, L_img, L_text)``.

    Args:
        pixels: (B, K, p*p*C); ``pixels[:, k]`` predicts patch k + 1.
        logits: (B, T, V); ``logits[:, t]`` predicts ``targets[:, t]``.
        images: the normalized NHWC input images (B, H, W, C).
        prefix_lengths: int (B,), each in [1, K-1].
        targets: int (B, T), the sequences of ``caption_sequences`` without their first token.
    """
    image_loss = next_patch_loss(pixels, images, prefix_lengths, patch_size)
    text_loss = caption_loss(logits, targets, pad)
    return text_loss + alpha * image_loss, image_loss, text_loss
