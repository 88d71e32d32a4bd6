"""The compiled training step: prefix sampling, next-patch loss, gradients, all-reduce, AdamW.

The step is compiled over ``[model.state, optimizer.state, mx.random.state]`` (mlx-lm's idiom):
the prefix lengths are drawn inside it from MLX's global random state and the learning rate
comes from the optimizer's schedule, so nothing that changes between steps is a Python scalar.

By default the prefix lengths come in antithetic pairs (S, K - S) and the pixel head predicts only
the patches the loss reads (``packed_next_patch_loss``): the trunk encodes every patch, the
positions the loss reads are gathered (``packed_prediction_index``) and the head runs there only,
a fixed ceil(B / 2) * K predictions per batch instead of B * K, about half the head's work, with
the same loss and gradients as ``objective.next_patch_loss``. ``paired_prefixes=False`` draws every
length independently and runs the head at every position.

Data parallelism: every process draws the prefix lengths of the whole global batch from the same
random state and keeps its own slice, and weighs its loss by its share of the global number of
predicted patches. Averaging the gradients over processes then gives exactly the gradient of the
single-process loss on the global batch (the mean over all non-prefix patches of the batch).

Mixed precision (``compute_dtype=bfloat16``): the model keeps float32 master weights and the
optimizer float32 moments; the loss function casts a bfloat16 copy of the weights into the model
and feeds bfloat16 images, so the forward and backward passes run in bfloat16 while gradients
arrive in float32 (the gradient of the cast). Targets and the loss are computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map, tree_reduce

from ..cpu import ops
from ..objectives.next_patch import (
    PAPER_VARIANT,
    Variant,
    mean_patch_error,
    next_patch_loss,
    predicted_patches,
)
from .optim import scaled_update


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


def packed_next_patch_loss(
    model: nn.Module,
    inputs: mx.array,
    images: mx.array,
    prefix_lengths: mx.array,
    first: int = 0,
    variant: Variant = PAPER_VARIANT,
) -> mx.array:
    """``next_patch_loss`` of a pre-training model, its pixel head run only where the loss reads.

    Args:
        model: an ``aim_pretrain`` model (``encode`` and ``head``).
        inputs: the images as the model reads them (in the compute dtype).
        images: the normalized NHWC images (B, H, W, C) the targets are cut from.
        prefix_lengths: int (B,), paired as ``sample_paired_prefix_lengths`` draws them.
        first: the global index of image 0 (the pairs run across the global batch).
        variant: the targets and the patch order (prefix attention only).
    """
    tokens = model.encode(inputs, prefix_lengths, variant.order_index())
    index, weights = packed_prediction_index(prefix_lengths, tokens.shape[1], first)
    predictions = model.head(tokens.reshape(-1, tokens.shape[-1])[index])
    targets = variant.targets(images, model.encoder.args.patch_size)
    targets = targets.reshape(-1, targets.shape[-1])[index + 1]  # patch k + 1, same image
    return mean_patch_error(predictions, targets, weights)


def cast_floats(params, dtype: mx.Dtype):
    """``params`` with every floating-point array cast to ``dtype`` (mixed precision)."""
    return tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, params)


def global_norm(grads) -> mx.array:
    """L2 norm of all gradients together."""
    return mx.sqrt(tree_reduce(lambda acc, g: acc + ops.sum_of_squares(g), grads, 0.0))


def accumulate_or_update(
    model: nn.Module,
    optimizer: optim.Optimizer,
    grads,
    accumulated,
    update: bool,
    accum_steps: int,
    world_size: int,
    grad_clip: float,
):
    """Add the micro-batch's ``grads`` to ``accumulated``; on the last micro-batch (``update``)
    average them over the micro-batches and the processes, clip (``grad_clip`` 0: no clipping)
    and apply them. Returns the running sum, or the gradient norm before clipping."""
    if accumulated is not None:
        grads = tree_map(mx.add, grads, accumulated)
    if not update:
        return grads
    if accum_steps > 1:
        grads = tree_map(lambda g: g / accum_steps, grads)
    if world_size > 1:
        grads = nn.average_gradients(grads)
    norm = global_norm(grads)
    if grad_clip > 0:  # optim.clip_grad_norm's factor, applied inside the update
        scaled_update(optimizer, model, grads, mx.minimum(grad_clip / (norm + 1e-6), 1.0))
    else:
        optimizer.update(model, grads)
    return norm


def step_over_micro_batches(
    micro_step: Callable, micro_batches: list[tuple[mx.array, ...]], state: list
) -> tuple[mx.array, mx.array, mx.array]:
    """One optimizer step of a compiled ``micro_step(*inputs, accumulated, update, accum_steps)
    -> (loss, parts, out)`` over the micro-batches: ``(mean loss, gradient norm, mean parts)``,
    evaluated. ``out`` is the running gradient sum, and the norm after the last micro-batch."""
    accumulated, losses, parts = None, [], []
    for i, inputs in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        loss, part, out = micro_step(*inputs, accumulated, last, len(micro_batches))
        losses.append(loss)
        parts.append(part)
        if not last:
            accumulated = out
            mx.eval(accumulated, loss, part, state)
    loss, part = mx.stack(losses).mean(), mx.stack(parts).mean(axis=0)
    mx.eval(state, loss, part, out)
    return loss, out, part


def make_train_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    global_batch: int,
    rank: int = 0,
    world_size: int = 1,
    grad_clip: float = 1.0,
    compute_dtype: mx.Dtype = mx.float32,
    paired_prefixes: bool = True,
    variant: Variant = PAPER_VARIANT,
) -> Callable[[list[mx.array]], tuple[mx.array, mx.array]]:
    """Build ``train_step(micro_batches) -> (loss, grad_norm)``, one optimizer update.

    Each micro-batch is this process's slice (``global_batch // world_size`` normalized NHWC
    images). Gradients are averaged over the micro-batches and the processes, clipped to
    ``grad_clip`` (0: no clipping) and applied. ``loss`` is the mean micro-batch loss over the
    global batch and ``grad_norm`` the norm before clipping, both identical on every process;
    they and the model and optimizer state are evaluated when the call returns. (Set
    ``MLX_DISABLE_COMPILE=1`` to debug the step uncompiled.) ``variant`` selects the objective
    (targets, attention, patch order); causal attention has no prefix to pair, so its step runs
    the head at every position.
    """
    encoder = model.encoder.args
    patch_size = encoder.patch_size
    num_patches = encoder.num_patches
    local_batch = global_batch // world_size
    state = [model.state, optimizer.state, mx.random.state]
    packed = paired_prefixes and not variant.causal
    order = variant.order_index()

    def loss_fn(params, images, prefix, weight):
        model.update(cast_floats(params, compute_dtype) if compute_dtype != mx.float32 else params)
        inputs = images.astype(compute_dtype)
        if packed:
            loss = packed_next_patch_loss(
                model, inputs, images, prefix, first=rank * local_batch, variant=variant
            )
        else:
            predictions = model(inputs, prefix, order)
            loss = next_patch_loss(predictions, images, prefix, patch_size, variant)
        return loss * weight  # float32 targets

    value_and_grad = mx.value_and_grad(loss_fn)

    def micro_step(images, accumulated, update, accum_steps):
        prefix_all = variant.prefix_lengths(global_batch, num_patches, paired=paired_prefixes)
        prefix = prefix_all[rank * local_batch : (rank + 1) * local_batch]
        # this process's share of the predicted patches of the global batch, times world size
        counts, counts_all = (predicted_patches(s, num_patches) for s in (prefix, prefix_all))
        weight = counts.sum() * world_size / counts_all.sum()
        params = model.trainable_parameters()
        loss, grads = value_and_grad(params, images, prefix, weight.astype(mx.float32))
        model.update(params)  # back to the float32 masters (the loss function swapped in copies)
        if world_size > 1:
            loss = mx.distributed.all_sum(loss) / world_size
        update_args = (accumulated, update, accum_steps, world_size, grad_clip)
        return loss, accumulate_or_update(model, optimizer, grads, *update_args)

    micro_step = partial(mx.compile, inputs=state, outputs=state)(micro_step)

    def train_step(micro_batches: list[mx.array]) -> tuple[mx.array, mx.array]:
        accumulated, losses = None, []
        for i, images in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            loss, out = micro_step(images, accumulated, last, len(micro_batches))
            losses.append(loss)
            if not last:
                accumulated = out
                mx.eval(accumulated, loss, state)
        loss = losses[0] if len(losses) == 1 else mx.stack(losses).mean()
        mx.eval(state, loss, out)
        return loss, out

    return train_step
