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

Data parallelism works as in the AIMv1 step: every process draws the prefix lengths of the whole
global batch from the same random state and keeps its own slice. Both losses are means over the
global batch (``L_img`` over its predicted patches, ``L_text`` over its target tokens), so each
process weighs its local ``L_img`` by its share of the global predicted patches and its local
``L_text`` by its share of the global target tokens (all-summed in the step), times the number of
processes; averaging the gradients then gives exactly the gradient of the single-process loss on
the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from ..objectives.multimodal import IMAGE_LOSS_WEIGHT, multimodal_loss
from ..objectives.next_patch import predicted_patches, sample_prefix_lengths
from .step import accumulate_or_update, cast_floats, step_over_micro_batches

Batch = tuple[mx.array, mx.array]  # normalized NHWC images (B, H, W, C), int32 sequences (B, T+1)


def make_multimodal_train_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    pad: int,
    rank: int = 0,
    world_size: int = 1,
    alpha: float = IMAGE_LOSS_WEIGHT,
    grad_clip: float = 1.0,
    compute_dtype: mx.Dtype = mx.float32,
) -> Callable[[list[Batch]], tuple[mx.array, mx.array, mx.array]]:
    """Build ``train_step(micro_batches) -> (loss, grad_norm, parts)``, one optimizer update.

    Each micro-batch is ``(images, sequences)``: this process's slice of the global batch (the
    same size on every process), the images and their ``caption_sequences`` rows (``[BOS]
    caption [EOS]`` padded with ``pad``). Gradients are averaged over the micro-batches and the
    processes, clipped to ``grad_clip`` (0: no clipping) and applied. ``loss`` (``L_text + alpha
    * L_img``) and ``parts`` (``[L_img, L_text]``) are the global batch's, averaged over the
    micro-batches, and ``grad_norm`` is the norm before clipping, all identical on every process;
    everything is evaluated when the call returns. (Set ``MLX_DISABLE_COMPILE=1`` to debug the
    step uncompiled.)
    """
    num_patches = model.encoder.args.num_patches
    patch_size = model.encoder.args.patch_size
    state = [model.state, optimizer.state, mx.random.state]

    def loss_fn(params, images, prefix, sequences, weights):
        model.update(cast_floats(params, compute_dtype) if compute_dtype != mx.float32 else params)
        pixels, logits = model(images.astype(compute_dtype), prefix, sequences[:, :-1])
        _, image, text = multimodal_loss(
            pixels, logits, images, prefix, sequences[:, 1:], patch_size=patch_size, pad=pad,
            alpha=alpha,
        )  # fmt: skip
        parts = mx.stack([image, text]) * weights  # this process's terms of the global means
        return parts[1] + alpha * parts[0], parts

    value_and_grad = mx.value_and_grad(loss_fn)

    def share_weights(prefix_all, prefix, sequences):
        """[image, text] weights: this process's share of the global patches and tokens, times W."""
        patches, patches_all = (
            predicted_patches(s, num_patches).sum() for s in (prefix, prefix_all)
        )
        tokens = (sequences[:, 1:] != pad).sum()
        tokens_all = mx.distributed.all_sum(tokens) if world_size > 1 else tokens
        shares = mx.stack([patches / patches_all, tokens / mx.maximum(tokens_all, 1)])
        return (shares * world_size).astype(mx.float32)

    def micro_step(images, sequences, accumulated, update, accum_steps):
        local_batch = images.shape[0]  # the same on every process
        prefix_all = sample_prefix_lengths(local_batch * world_size, num_patches)
        prefix = prefix_all[rank * local_batch : (rank + 1) * local_batch]
        weights = share_weights(prefix_all, prefix, sequences)
        params = model.trainable_parameters()
        (loss, parts), grads = value_and_grad(params, images, prefix, sequences, weights)
        model.update(params)  # back to the float32 masters (the loss function swapped in copies)
        if world_size > 1:
            loss = mx.distributed.all_sum(loss) / world_size
            parts = mx.distributed.all_sum(parts) / world_size
        update_args = (accumulated, update, accum_steps, world_size, grad_clip)
        return loss, parts, accumulate_or_update(model, optimizer, grads, *update_args)

    micro_step = partial(mx.compile, inputs=state, outputs=state)(micro_step)

    def train_step(micro_batches: list[Batch]) -> tuple[mx.array, mx.array, mx.array]:
        return step_over_micro_batches(micro_step, micro_batches, state)

    return train_step
