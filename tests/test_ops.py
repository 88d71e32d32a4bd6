"""GELU and attention of mlx_aim.models.ops against exact float64 math, and their backend switch."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_aim.cpu import ops
from mlx_aim.models.layers import MLP, Block, Transformer, layer_norm, prefix_causal_mask

_erf = np.vectorize(math.erf)
WIDE = np.concatenate(
    [np.linspace(-12.0, 12.0, 24001), [-1e4, -300.0, -30.0, 30.0, 300.0, 1e4, 1e-30, -1e-30]]
).astype(np.float32)


@pytest.fixture(autouse=True)
def cpu_fast_math(monkeypatch):
    """Every test runs the CPU kernels (also on machines with a GPU) unless it says otherwise."""
    monkeypatch.delenv("MLX_AIM_CPU_KERNELS", raising=False)
    with mx.stream(mx.cpu):
        assert ops.cpu_kernels_enabled()
        yield


def gelu64(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_slope64(x: np.ndarray) -> np.ndarray:
    density = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * density


def gelu_and_grad(x: mx.array, cotangent: mx.array) -> tuple[np.ndarray, np.ndarray]:
    (y,), (dx,) = mx.vjp(ops.gelu, [x], [cotangent])
    return np.array(y.astype(mx.float32)), np.array(dx.astype(mx.float32))


def test_gelu_is_exact_gelu_to_float32_accuracy_over_a_wide_range():
    x = WIDE.astype(np.float64)
    y, dx = gelu_and_grad(mx.array(WIDE), mx.ones(WIDE.shape))
    assert np.all(np.abs(y - gelu64(x)) <= 1e-6 * np.maximum(1.0, np.abs(x)))
    assert np.abs(dx - gelu_slope64(x)).max() <= 1e-6
    assert np.abs(gelu64(x)).max() > 1e3 and np.abs(gelu_slope64(x) - 1.0).max() > 0.5


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_gelu_of_half_precision_is_the_exact_value_rounded(dtype):
    x = mx.array(np.linspace(-8.0, 8.0, 4001, dtype=np.float32)).astype(dtype)
    x64 = np.array(x.astype(mx.float32)).astype(np.float64)
    (y,), (dx,) = mx.vjp(ops.gelu, [x], [mx.ones(x.shape, dtype)])
    assert y.dtype == dtype and dx.dtype == dtype
    ulp = float(mx.finfo(dtype).eps)
    for got, exact in ((y, gelu64(x64)), (dx, gelu_slope64(x64))):
        err = np.abs(np.array(got.astype(mx.float32)) - exact)
        assert np.all(err <= ulp * np.abs(exact) + 1e-6)  # one rounding: at most an ulp apart


def softmax_attention64(q, k, v, go, scale, allowed, additive):
    """Forward and q/k/v gradients of softmax(q k^T scale + mask) v in float64."""
    q, k, v, go = (np.array(a.astype(mx.float32), dtype=np.float64) for a in (q, k, v, go))
    s = q @ k.swapaxes(-1, -2) * scale + additive
    s = np.where(allowed, s, np.finfo(np.float32).min)
    e = np.exp(s - s.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    dp = go @ v.swapaxes(-1, -2)
    ds = np.where(allowed, p * (dp - (dp * p).sum(-1, keepdims=True)), 0.0)  # masked: constants
    return p @ v, ds @ k * scale, ds.swapaxes(-1, -2) @ q * scale, p.swapaxes(-1, -2) @ go


def _mask(kind: str, b: int, n_q: int, n_k: int):
    """(mask for ops.attention, boolean allowed, additive) for one mask kind."""
    causal = np.arange(n_q)[:, None] + (n_k - n_q) >= np.arange(n_k)[None]
    if kind == "none":
        return None, True, 0.0
    if kind == "causal":
        return "causal", causal, 0.0
    if kind == "bool":
        allowed = np.array(prefix_causal_mask(mx.array([2, n_k - 1]), n_k))
        allowed[0, 0, 3] = False  # a fully masked row: attends uniformly, as mx.fast does
        return mx.array(allowed), allowed, 0.0
    additive = np.where(causal, 0.0, -np.inf)[None, None].repeat(b, 0)
    additive[1, 0, :, 0] = -5.0
    return mx.array(additive.astype(np.float32)), True, additive


@pytest.mark.parametrize(
    "kind, n_q, sharpness",
    [
        ("none", 9, 1.0),
        ("none", 9, 30.0),  # scores in the hundreds: the max shift and the exp range matter
        ("causal", 9, 1.0),
        ("causal", 5, 1.0),  # fewer queries than keys: aligned to the last key, as mx.fast
        ("bool", 9, 1.0),
        ("additive", 9, 3.0),  # -inf entries
    ],
)
def test_attention_matches_float64_softmax_attention(kind, n_q, sharpness):
    b, h, n_k, d = 2, 3, 9, 8
    q, go = (mx.random.normal((b, h, n_q, d)) for _ in range(2))
    k, v = (mx.random.normal((b, h, n_k, d)) for _ in range(2))
    q = q * sharpness
    mask, allowed, additive = _mask(kind, b, n_q, n_k)
    scale = d**-0.5

    out, grads = mx.vjp(lambda q, k, v: ops.attention(q, k, v, scale, mask), [q, k, v], [go])
    expected = softmax_attention64(q, k, v, go, scale, allowed, additive)
    for got, want in zip([*out, *grads], expected, strict=True):
        assert np.abs(np.array(got) - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    reference = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    assert np.abs(np.array(out[0] - reference)).max() <= 1e-5 * sharpness


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_attention_in_half_precision_keeps_the_dtype_and_the_values(dtype):
    q, k, v, go = (mx.random.normal((2, 2, 7, 8)) for _ in range(4))
    mask = prefix_causal_mask(mx.array([2, 5]), 7)
    half = [a.astype(dtype) for a in (q, k, v, go)]
    out, grads = mx.vjp(lambda q, k, v: ops.attention(q, k, v, 8**-0.5, mask), half[:3], half[3:])
    assert all(a.dtype == dtype for a in [*out, *grads])
    expected = softmax_attention64(*half, 8**-0.5, np.array(mask), 0.0)
    tol = 8 * float(mx.finfo(dtype).eps)
    for got, want in zip([*out, *grads], expected, strict=True):
        assert np.abs(np.array(got.astype(mx.float32)) - want).max() <= tol * np.abs(want).max()


def test_nan_inputs_give_nan_like_the_reference():
    x = mx.array([0.5, float("nan"), -2.0])
    (y,), (dx,) = mx.vjp(ops.gelu, [x], [mx.ones(3)])
    assert np.isnan(np.array(y)).tolist() == np.isnan(np.array(dx)).tolist() == [False, True, False]
    q = mx.random.normal((1, 1, 2, 4))
    mask = mx.array([[[[0.0, float("nan")], [0.0, 0.0]]]])  # poisons the scores of query 0
    out = np.array(ops.attention(q, q, q, 0.5, mask))
    assert np.isnan(out[0, 0, 0]).all() and not np.isnan(out[0, 0, 1]).any()


def test_unknown_mask_name_is_one_clear_error():
    q = mx.zeros((1, 1, 2, 4))
    with pytest.raises(ValueError, match="'causal', an array or None, got 'casual'"):
        ops.attention(q, q, q, 0.5, "casual")


def _reference_equal(x: mx.array, q: mx.array, mask) -> tuple[bool, bool]:
    same_gelu = mx.array_equal(ops.gelu(x), nn.gelu(x)).item()
    sdpa = mx.fast.scaled_dot_product_attention(q, q, q, scale=0.5, mask=mask)
    return same_gelu, mx.array_equal(ops.attention(q, q, q, 0.5, mask), sdpa).item()


def test_env_var_and_backend_select_the_implementation(monkeypatch):
    x = mx.random.normal((64, 64)) * 3
    q = mx.random.normal((2, 2, 6, 4))
    mask = prefix_causal_mask(mx.array([1, 4]), 6)
    assert _reference_equal(x, q, mask) == (False, False)  # CPU: the fast kernels run

    monkeypatch.setenv("MLX_AIM_CPU_KERNELS", "0")
    assert not ops.cpu_kernels_enabled()
    assert _reference_equal(x, q, mask) == (True, True)

    monkeypatch.setenv("MLX_AIM_CPU_KERNELS", "1")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert not ops.cpu_kernels_enabled()  # GPU backends keep MLX's fused kernels
    assert _reference_equal(x, q, mask) == (True, True)


def test_float64_inputs_use_the_reference_ops():
    x = mx.random.normal((32,)).astype(mx.float64)
    assert not ops.cpu_kernels_enabled(x)
    assert mx.array_equal(ops.gelu(x), nn.gelu(x)).item()


def _block_loss_and_grads(fast: bool, monkeypatch):
    monkeypatch.setenv("MLX_AIM_CPU_KERNELS", "1" if fast else "0")
    mx.random.seed(3)
    trunk = Transformer([Block(32, 4, MLP(32, 96), layer_norm) for _ in range(2)], layer_norm(32))
    x = mx.random.normal((2, 12, 32)) * 2
    mask = prefix_causal_mask(mx.array([3, 7]), 12)
    target = mx.random.normal((2, 12, 32))

    def loss_fn(model, x):
        return ((model(x, mask) - target) ** 2).mean()

    loss_and_grad = nn.value_and_grad(trunk, loss_fn)

    def step(x):
        return loss_and_grad(trunk, x)

    if fast:
        trunk.checkpoint_blocks = True
        step = mx.compile(step, inputs=trunk.state, outputs=trunk.state)
    loss, grads = step(x)
    return loss.item(), dict(tree_flatten(grads))


def test_blocks_train_alike_compiled_checkpointed_and_reference(monkeypatch):
    loss, grads = _block_loss_and_grads(True, monkeypatch)
    ref_loss, ref_grads = _block_loss_and_grads(False, monkeypatch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for key, g in grads.items():
        scale = np.abs(np.array(ref_grads[key])).max()
        assert scale > 0 and np.abs(np.array(g - ref_grads[key])).max() <= 1e-5 * scale, key
