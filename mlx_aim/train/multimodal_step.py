"""The compiled AIMv2 training step: prefix sampling, image and caption losses, gradients, AdamW.

Like the AIMv1 step (``step.py``), it is compiled over ``[model.state, optimizer.state,
mx.random.state]``: the prefix lengths are drawn inside it from MLX's global random state and the
learning rate comes from the optimizer's schedule, so a resumed run that restores the three
states continues bit for bit.

Each image gets its own prefix length, uniform on {1, ..., K-1} (``multimodal_objective``), and
the decoder predicts at every position. With gradient accumulation, the micro-batch losses (and
gradients) are averaged with equal weights, as in the AIMv1 step. Mixed precision works as there:
float32 master weights and optimizer moments, a bfloat16 copy of the weights in the forward and
backward passes, float32 targets and losses.

One process only: the caption loss averages over a batch's tokens, and splitting that mean
across processes is not implemented.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..multimodal_objective import IMAGE_LOSS_WEIGHT, multimodal_loss
from ..objective import sample_prefix_lengths
from .step import _cast, global_norm

Batch = tuple[mx.array, mx.array]  # normalized NHWC images (B, H, W, C), int32 sequences (B, T+1)


def make_multimodal_train_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    pad: int,
    alpha: float = IMAGE_LOSS_WEIGHT,
    grad_clip: float = 1.0,
    compute_dtype: mx.Dtype = mx.float32,
) -> Callable[[list[Batch]], tuple[mx.array, mx.array, mx.array]]:
    """Build ``train_step(micro_batches) -> (loss, grad_norm, parts)``, one optimizer update.

    Each micro-batch is ``(images, sequences)``: the images and their ``caption_sequences`` rows
    (``[BOS] caption [EOS]`` padded with ``pad``). Gradients are averaged over the micro-batches,
    clipped to ``grad_clip`` (0: no clipping) and applied. ``loss`` (``L_text + alpha * L_img``)
    and ``parts`` (``[L_img, L_text]``) are means over the micro-batches and ``grad_norm`` is the
    norm before clipping; everything is evaluated when the
    call returns. (Set ``MLX_DISABLE_COMPILE=1`` to debug the step uncompiled.)
    """
    num_patches = model.encoder.args.num_patches
    patch_size = model.encoder.args.patch_size
    state = [model.state, optimizer.state, mx.random.state]

    def loss_fn(params, images, prefix, sequences):
        model.update(_cast(params, compute_dtype) if compute_dtype != mx.float32 else params)
        pixels, logits = model(images.astype(compute_dtype), prefix, sequences[:, :-1])
        total, image, text = multimodal_loss(
            pixels, logits, images, prefix, sequences[:, 1:], patch_size=patch_size, pad=pad,
            alpha=alpha,
        )  # fmt: skip
        return total, mx.stack([image, text])

    value_and_grad = mx.value_and_grad(loss_fn)

    def micro_step(images, sequences, accumulated, update, accum_steps):
        prefix = sample_prefix_lengths(images.shape[0], num_patches)
        params = model.trainable_parameters()
        (loss, parts), grads = value_and_grad(params, images, prefix, sequences)
        model.update(params)  # back to the float32 masters (the loss function swapped in copies)
        if accumulated is not None:
            grads = tree_map(mx.add, grads, accumulated)
        if not update:
            return loss, parts, grads
        if accum_steps > 1:
            grads = tree_map(lambda g: g / accum_steps, grads)
        if grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, grad_clip)
        else:
            norm = global_norm(grads)
        optimizer.update(model, grads)
        return loss, parts, norm

    micro_step = partial(mx.compile, inputs=state, outputs=state)(micro_step)

    def train_step(micro_batches: list[Batch]) -> tuple[mx.array, mx.array, mx.array]:
        accumulated, losses, parts = None, [], []
        for i, (images, sequences) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            loss, part, out = micro_step(images, sequences, accumulated, last, len(micro_batches))
            losses.append(loss)
            parts.append(part)
            if not last:
                accumulated = out
                mx.eval(accumulated, loss, part, state)
        loss, part = mx.stack(losses).mean(), mx.stack(parts).mean(axis=0)
        mx.eval(state, loss, part, out)
        return loss, out, part

    return train_step
