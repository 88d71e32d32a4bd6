"""The compiled training step: prefix sampling, next-patch loss, gradients, all-reduce, AdamW.

The step is compiled over ``[model.state, optimizer.state, mx.random.state]`` (mlx-lm's idiom):
the prefix lengths are drawn inside it from MLX's global random state and the learning rate
comes from the optimizer's schedule, so nothing that changes between steps is a Python scalar.

By default the prefix lengths come in antithetic pairs (S, K - S) and the pixel head predicts only
the patches the loss reads (``objective.packed_prediction_index``): a fixed ceil(B / 2) * K
predictions per batch instead of B * K, the same loss and gradients. ``paired_prefixes=False``
draws every length independently and runs the head at every position.

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

from ..objective import (
    next_patch_loss,
    packed_next_patch_loss,
    packed_prediction_index,
    sample_paired_prefix_lengths,
    sample_prefix_lengths,
)


def _cast(params, dtype: mx.Dtype):
    return tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, params)


def global_norm(grads) -> mx.array:
    """L2 norm of all gradients together."""
    return mx.sqrt(
        tree_reduce(lambda acc, g: acc + g.astype(mx.float32).square().sum(), grads, 0.0)
    )


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
) -> Callable[[list[mx.array]], tuple[mx.array, mx.array]]:
    """Build ``train_step(micro_batches) -> (loss, grad_norm)``, one optimizer update.

    Each micro-batch is this process's slice (``global_batch // world_size`` normalized NHWC
    images). Gradients are averaged over the micro-batches and the processes, clipped to
    ``grad_clip`` (0: no clipping) and applied. ``loss`` is the mean micro-batch loss over the
    global batch and ``grad_norm`` the norm before clipping, both identical on every process;
    they and the model and optimizer state are evaluated when the call returns. (Set
    ``MLX_DISABLE_COMPILE=1`` to debug the step uncompiled.)
    """
    encoder = model.encoder.args
    patch_size = encoder.patch_size
    num_patches = encoder.num_patches
    local_batch = global_batch // world_size
    state = [model.state, optimizer.state, mx.random.state]
    sample = sample_paired_prefix_lengths if paired_prefixes else sample_prefix_lengths

    def loss_fn(params, images, prefix, weight):
        model.update(_cast(params, compute_dtype) if compute_dtype != mx.float32 else params)
        inputs = images.astype(compute_dtype)
        if paired_prefixes:
            index, valid = packed_prediction_index(prefix, num_patches, first=rank * local_batch)
            predictions = model(inputs, prefix, index)
            loss = packed_next_patch_loss(predictions, images, index, valid, patch_size)
        else:
            loss = next_patch_loss(model(inputs, prefix), images, prefix, patch_size)
        return loss * weight  # float32 targets

    value_and_grad = mx.value_and_grad(loss_fn)

    def micro_step(images, accumulated, update, accum_steps):
        prefix_all = sample(global_batch, num_patches)
        prefix = prefix_all[rank * local_batch : (rank + 1) * local_batch]
        # this process's share of the predicted patches of the global batch, times world size
        weight = (num_patches - prefix).sum() * world_size / (num_patches - prefix_all).sum()
        params = model.trainable_parameters()
        loss, grads = value_and_grad(params, images, prefix, weight.astype(mx.float32))
        model.update(params)  # back to the float32 masters (the loss function swapped in copies)
        if world_size > 1:
            loss = mx.distributed.all_sum(loss) / world_size
        if accumulated is not None:
            grads = tree_map(mx.add, grads, accumulated)
        if not update:
            return loss, grads
        if accum_steps > 1:
            grads = tree_map(lambda g: g / accum_steps, grads)
        if world_size > 1:
            grads = nn.average_gradients(grads)
        if grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, grad_clip)
        else:
            norm = global_norm(grads)
        optimizer.update(model, grads)
        return loss, norm

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
