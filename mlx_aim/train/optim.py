"""AdamW with parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

Schedule = Callable[[mx.array], mx.array]


def warmup_cosine(peak: float, warmup: int, total: int, minimum: float) -> Schedule:
    """Learning rate of update ``step`` (0-based): linear warm-up then cosine decay.

    Update ``s < warmup`` uses ``peak * (s + 1) / warmup``; the cosine then runs from ``peak`` at
    update ``warmup`` to ``minimum`` at update ``total - 1`` and stays there.
    """
    decay_steps = max(1, total - 1 - warmup)

    def schedule(step: mx.array) -> mx.array:
        s = step.astype(mx.float32)
        warm = peak * (s + 1) / max(1, warmup)
        progress = mx.clip((s - warmup) / decay_steps, 0.0, 1.0)
        cosine = minimum + 0.5 * (peak - minimum) * (1 + mx.cos(math.pi * progress))
        return mx.where(s < warmup, warm, cosine)

    return schedule


def decays(path: str, parameter: mx.array) -> bool:
    """Whether weight decay applies: matrices and convolutions, not norms, biases, positions."""
    return parameter.ndim >= 2 and "pos_embed" not in path and "cls_token" not in path


def build_optimizer(
    model: nn.Module,
    schedule: Schedule,
    *,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
) -> optim.Optimizer:
    """AdamW (bias-corrected, eps 1e-8) over two groups: decayed and not decayed, one schedule.

    The state is created here (``init``), so that a compiled step never sees it change shape.
    """

    def adamw(decay: float) -> optim.AdamW:
        return optim.AdamW(schedule, betas=list(betas), weight_decay=decay, bias_correction=True)

    optimizer = optim.MultiOptimizer([adamw(weight_decay), adamw(0.0)], [decays])
    optimizer.init(model.trainable_parameters())
    return optimizer
