"""The compiled LiT step and validation: attention-pool head, projections and text tower trained
with the symmetric contrastive loss on the frozen trunk's tokens.

A step reads the trunk's final-norm tokens (B, N, D) of each image (cached, see ``lit.py``) and
the caption's token ids (B, L); it runs only the trainable parts: the image encoder's
attention-pooling head, both projections, the text tower and the logit scale. Like the other
steps it is compiled over ``[model.state, optimizer.state, mx.random.state]`` and averages the
gradients over ``--grad-accum`` micro-batches (each micro-batch is its own contrastive batch) and
the processes. With several processes the negatives are those of the global batch
(``objectives.contrastive.gather_with_grad``), so the averaged gradient is the single-process
gradient of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..objectives.contrastive import contrastive_loss
from .step import accumulate_or_update, step_over_micro_batches

Batch = tuple[mx.array, mx.array]  # trunk tokens (B, N, D), token ids (B, L)


def lit_embeddings(model: nn.Module, tokens: mx.array, ids: mx.array) -> tuple[mx.array, mx.array]:
    """Unnormalised image and text embeddings (B, P) from trunk tokens and token ids."""
    images = model.image_projector(model.image_encoder.head(tokens))
    return images, model.encode_text(ids)


def make_lit_train_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    world_size: int = 1,
    grad_clip: float = 1.0,
) -> Callable[[list[Batch]], tuple[mx.array, mx.array, mx.array]]:
    """Build ``train_step(micro_batches) -> (loss, grad_norm, accuracy)``, one optimizer update.

    ``loss`` and ``accuracy`` (in-batch top-1, both directions) are the global batch's, averaged
    over the micro-batches, identical on every process; ``grad_norm`` is the norm before
    clipping. Only ``model.trainable_parameters()`` are trained (freeze the trunk first).
    """
    state = [model.state, optimizer.state, mx.random.state]
    max_scale = model.args.max_logit_scale
    # the ids come from the run's tokenizer, whose vocabulary is the tower's; the tower's own
    # range check evaluates, which a compiled function cannot
    model.text_encoder.preprocessor.check_ids = False

    def loss_fn(params, tokens, ids):
        model.update(params)
        images, texts = lit_embeddings(model, tokens, ids)
        return contrastive_loss(
            images, texts, model.log_logit_scale, max_scale=max_scale, world_size=world_size
        )

    value_and_grad = mx.value_and_grad(loss_fn)

    def micro_step(tokens, ids, accumulated, update, accum_steps):
        params = model.trainable_parameters()
        (loss, accuracy), grads = value_and_grad(params, tokens, ids)
        model.update(params)
        update_args = (accumulated, update, accum_steps, world_size, grad_clip)
        return loss, accuracy[None], accumulate_or_update(model, optimizer, grads, *update_args)

    micro_step = partial(mx.compile, inputs=state, outputs=state)(micro_step)

    def train_step(micro_batches: list[Batch]) -> tuple[mx.array, mx.array, mx.array]:
        return step_over_micro_batches(micro_step, micro_batches, state)

    return train_step


class LitValidation:
    """Contrastive loss and in-batch accuracy of a fixed validation subset, all of it one batch
    (every rank computes the same numbers). ``parts`` holds the accuracy after ``evaluate``."""

    def __init__(self, tokens: np.ndarray, ids: np.ndarray, size: int, seed: int):
        n = len(ids)
        keep = np.sort(np.random.default_rng([seed, 7]).permutation(n)[: min(size, n)])
        self.tokens, self.ids = tokens, ids
        self.subset = keep.tolist()
        self.enabled = len(self.subset) > 1
        self.parts: dict[str, float] = {}

    def evaluate(self, model: nn.Module, batch: int = 256) -> float | None:
        """The loss of the subset (negatives: the whole subset)."""
        if not self.enabled:
            return None
        images, texts = [], []
        for i in range(0, len(self.subset), batch):
            rows = self.subset[i : i + batch]
            pair = lit_embeddings(
                model, mx.array(self.tokens[rows], mx.float32), mx.array(self.ids[rows])
            )
            mx.eval(pair)
            images.append(pair[0])
            texts.append(pair[1])
        loss, accuracy = contrastive_loss(
            mx.concatenate(images),
            mx.concatenate(texts),
            model.log_logit_scale,
            max_scale=model.args.max_logit_scale,
        )
        self.parts = {"accuracy": accuracy.item()}
        return loss.item()
