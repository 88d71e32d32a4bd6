"""AdamW with parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..cpu import ops

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


class AdamW(optim.AdamW):
    """``mlx.optimizers.AdamW`` (same arguments, state and math) that applies a pending gradient
    scale (``gradient_scale``: the clipping factor, set by ``scaled_update``) inside its update.

    On the CPU each float32 update runs as one native kernel (``ops.adamw_kernels``): the same
    float32 operations in the same order, so the same bits as MLX's AdamW, vectorized and on every
    core, where MLX runs it as one scalar loop.
    """

    gradient_scale: mx.array | None = None

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        scale = self.gradient_scale
        native = ops.adamw_kernels(gradient, parameter, state["m"], state["v"])
        if native is None:
            if scale is not None:
                gradient = (gradient * scale).astype(gradient.dtype)
            return super().apply_single(gradient, parameter, state)
        lr = self.learning_rate.astype(mx.float32)
        b1, b2 = self.betas
        if self.bias_correction:  # the expressions of optim.Adam, rounded alike
            c1 = (lr / (1 - b1**self.step)).astype(mx.float32)
            c2 = mx.rsqrt(1 - b2**self.step).astype(mx.float32)
        else:
            c1, c2 = lr, mx.array(1.0)
        coefficients = [
            mx.array(1.0) if scale is None else scale,
            1 - lr * self.weight_decay,
            *(mx.array(c, mx.float32) for c in (b1, 1 - b1, b2, 1 - b2)),
            c1,
            c2,
            mx.array(self.eps, mx.float32),
        ]
        coefficients = mx.stack([c.astype(mx.float32).reshape(()) for c in coefficients])
        parameter, state["m"], state["v"] = native.adamw_update(
            parameter, gradient, state["m"], state["v"], coefficients
        )
        return parameter


def scaled_update(optimizer: optim.Optimizer, model: nn.Module, grads, scale: mx.array) -> None:
    """``optimizer.update(model, grads * scale)``; this module's AdamW (alone or in a
    ``MultiOptimizer``) scales inside its update, any other optimizer gets scaled gradients."""
    parts = getattr(optimizer, "optimizers", [optimizer])
    if not all(isinstance(part, AdamW) for part in parts):
        optimizer.update(model, tree_map(lambda g: (g * scale).astype(g.dtype), grads))
        return
    for part in parts:
        part.gradient_scale = scale
    try:
        optimizer.update(model, grads)
    finally:
        for part in parts:
            part.gradient_scale = None


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

    def adamw(decay: float) -> AdamW:
        return AdamW(schedule, betas=list(betas), weight_decay=decay, bias_correction=True)

    optimizer = optim.MultiOptimizer([adamw(weight_decay), adamw(0.0)], [decays])
    optimizer.init(model.trainable_parameters())
    return optimizer
