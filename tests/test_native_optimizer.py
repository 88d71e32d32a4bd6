"""The optimizer's native kernels (csrc/optimizer.cpp): mlx-aim's AdamW equals mlx.optimizers.AdamW
bit for bit, the clipping factor is applied inside the update, and the gradient norm's sum of
squares is float64-accurate and independent of the layout."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from parity import assert_parity

from mlx_aim.cpu import native, ops
from mlx_aim.train.optim import AdamW, scaled_update
from mlx_aim.train.step import global_norm


@pytest.fixture
def native_on(kernels, monkeypatch):
    monkeypatch.setattr(native, "_state", {"module": kernels})
    monkeypatch.delenv("MLX_AIM_NATIVE", raising=False)
    monkeypatch.delenv("MLX_AIM_CPU_KERNELS", raising=False)
    with mx.stream(mx.cpu):
        yield kernels


def _run(optimizer_class, scale, steps=3, **kwargs):
    """Parameters after ``steps`` updates of a small model with real (transposed) gradients."""
    mx.random.seed(1)
    model = nn.Sequential(nn.Linear(33, 70), nn.GELU(), nn.Linear(70, 9, bias=False))
    x, y = mx.random.normal((16, 33)), mx.random.normal((16, 9))
    optimizer = optimizer_class(learning_rate=lambda step: 1e-2 / (step + 1), **kwargs)
    grad_fn = nn.value_and_grad(model, lambda m: ((m(x) - y) ** 2).mean())
    for _ in range(steps):
        _, grads = grad_fn(model)
        if optimizer_class is AdamW:
            scaled_update(optimizer, model, grads, scale)
        else:  # what optim.clip_grad_norm does, then MLX's update
            optimizer.update(model, tree_map(lambda g: (g * scale).astype(g.dtype), grads))
        mx.eval(model.parameters(), optimizer.state)
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_native_adamw_equals_mlx_adamw_bit_for_bit(native_on, bias_correction, weight_decay):
    kwargs = dict(betas=[0.9, 0.95], weight_decay=weight_decay, bias_correction=bias_correction)
    scale = mx.array(0.37)
    ours = _run(AdamW, scale, **kwargs)
    theirs = _run(optim.AdamW, scale, **kwargs)
    for name, value in theirs.items():
        assert mx.array_equal(ours[name], value).item(), name


def test_the_update_runs_natively_on_the_cpu_for_float32(native_on, monkeypatch):
    calls = []
    real = native_on.adamw_update
    monkeypatch.setattr(native_on, "adamw_update", lambda *a: calls.append(1) or real(*a))
    _run(AdamW, mx.array(1.0), steps=1)
    assert len(calls) == 3  # two weights and a bias
    assert ops.adamw_kernels(mx.zeros(2, mx.bfloat16)) is None


def test_without_the_kernels_it_is_mlx_adamw_with_the_scale(monkeypatch):
    monkeypatch.setenv("MLX_AIM_NATIVE", "0")
    scale = mx.array(0.5)
    ours = _run(AdamW, scale, weight_decay=0.05)
    theirs = _run(optim.AdamW, scale, weight_decay=0.05)
    for name, value in theirs.items():
        assert mx.array_equal(ours[name], value).item(), name


def test_other_optimizers_get_scaled_gradients():
    model = nn.Linear(4, 3)
    before = dict(tree_flatten(model.parameters()))
    grads = {k: mx.ones_like(v) for k, v in model.trainable_parameters().items()}
    scaled_update(optim.SGD(learning_rate=1.0), model, grads, mx.array(0.25))
    for name, value in tree_flatten(model.parameters()):
        assert mx.allclose(value, before[name] - 0.25).item()


def test_the_scale_does_not_outlive_the_update(native_on):
    optimizer = optim.MultiOptimizer([AdamW(1e-3), AdamW(1e-3)], [lambda path, p: p.ndim > 1])
    model = nn.Linear(4, 3)
    grads = {k: mx.ones_like(v) for k, v in model.trainable_parameters().items()}
    scaled_update(optimizer, model, grads, mx.array(0.5))
    assert all(part.gradient_scale is None for part in optimizer.optimizers)


@pytest.mark.parametrize("shape", [(1,), (8191,), (300, 777)], ids=str)
def test_sum_of_squares_matches_float64_in_any_layout(native_on, shape):
    x = mx.random.normal(shape) * 3
    total = native_on.sum_of_squares(x)
    expected = float((np.array(x, np.float64) ** 2).sum())
    assert abs(total.item() - expected) <= 1e-6 * expected
    if len(shape) == 2:  # a transposed gradient: the same terms, read in memory order
        transposed = mx.array(np.array(x).T).T
        assert abs(native_on.sum_of_squares(transposed).item() - expected) <= 1e-6 * expected
    assert native_on.sum_of_squares(x).item() == total.item()  # a fixed order: repeatable


def test_global_norm_is_the_l2_norm_of_all_gradients(native_on):
    grads = {"a": mx.random.normal((40, 30)), "b": [mx.random.normal((7,))], "c": mx.ones((2, 2))}
    flat = np.concatenate([np.array(g, np.float64).ravel() for _, g in tree_flatten(grads)])
    assert_parity(global_norm(grads), np.sqrt((flat**2).sum()), rel=1e-6)
