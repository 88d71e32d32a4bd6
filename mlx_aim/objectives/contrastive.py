"""The symmetric contrastive (CLIP InfoNCE) loss of LiT training, with global negatives.

As open_clip's ``ClipLoss`` computes it: with unit image and text embeddings ``I`` and ``T`` (one
row per pair) and ``scale = exp(clip(log_scale, 0, log(max_scale)))``,
``logits_per_image = scale * I @ T.T``, ``logits_per_text`` its transpose, and the loss is the
mean of the two cross-entropies against the diagonal. The scale is learned from
``log(1 / 0.07)``; the clamp sits in the forward pass, as in the released AIMv2 LiT model, so a
log-scale past ``log(max_scale)`` gets no gradient.

Data parallel: every process gathers the embeddings of every process (``gather_with_grad``, as
open_clip's ``gather_features(gather_with_grad=True)``: the backward pass sums the cotangents of
all processes, so each process's own rows get the gradient of every copy of the loss) and
computes the loss of the global batch; averaging the parameter gradients over the processes then
gives the gradient of the single-process loss on the global batch.
"""

from __future__ import annotations

import math

import mlx.core as mx

INIT_LOG_SCALE = math.log(1 / 0.07)
MAX_SCALE = 100.0


def logit_scale(log_scale: mx.array, max_scale: float = MAX_SCALE) -> mx.array:
    """``exp(log_scale)`` with ``log_scale`` clamped to ``[0, log(max_scale)]``."""
    return mx.exp(mx.clip(log_scale, 0.0, math.log(max_scale)))


def l2_normalize(x: mx.array) -> mx.array:
    """``x`` scaled to unit L2 norm along the last axis."""
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def clip_loss(
    image_features: mx.array, text_features: mx.array, scale: mx.array
) -> tuple[mx.array, mx.array]:
    """``(loss, accuracy)`` of paired unit embeddings (B, D): the mean of the image-to-text and
    text-to-image cross-entropies of ``scale * cosine`` logits, and the in-batch top-1 accuracy
    of both directions (the fraction of rows whose own pair scores highest), averaged."""
    logits = scale * image_features @ text_features.T
    labels = mx.arange(logits.shape[0])
    diagonal = mx.diagonal(logits)
    per_image = mx.logsumexp(logits, axis=1) - diagonal
    per_text = mx.logsumexp(logits, axis=0) - diagonal
    loss = (per_image.mean() + per_text.mean()) / 2
    hits = (mx.argmax(logits, axis=1) == labels).sum() + (mx.argmax(logits, axis=0) == labels).sum()
    return loss, hits.astype(mx.float32) / (2 * logits.shape[0])


@mx.custom_function
def _all_gather(x: mx.array) -> mx.array:
    return mx.distributed.all_gather(x)


@_all_gather.vjp
def _all_gather_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    rows, rank = x.shape[0], mx.distributed.init().rank()
    summed = mx.distributed.all_sum(cotangent)  # every process's cotangent of the gathered rows
    return summed[rank * rows : (rank + 1) * rows]


def gather_with_grad(x: mx.array, world_size: int) -> mx.array:
    """Every process's rows of ``x`` (same shape on each), in rank order, concatenated on axis 0;
    the gradient of this process's rows is the sum of the gradients that every process computes
    for them (open_clip's ``gather_with_grad``). The identity in a single process."""
    return x if world_size == 1 else _all_gather(x)


def contrastive_loss(
    image_embeds: mx.array,
    text_embeds: mx.array,
    log_scale: mx.array,
    *,
    max_scale: float = MAX_SCALE,
    world_size: int = 1,
) -> tuple[mx.array, mx.array]:
    """``(loss, accuracy)`` of this process's paired embeddings (B, D), normalised here, against
    the global batch of ``world_size`` processes (see the module docstring)."""
    images = gather_with_grad(l2_normalize(image_embeds), world_size)
    texts = gather_with_grad(l2_normalize(text_embeds), world_size)
    return clip_loss(images, texts, logit_scale(log_scale, max_scale))
