"""The native fused attention (csrc/attention.cpp): softmax(scale q k^T, masked) v and its gradients
against float64, for the masks, shapes and layouts the models use, inside mx.compile, and the
routing in ops.attention."""

import mlx.core as mx
import numpy as np
import pytest
from parity import assert_parity

from mlx_aim.cpu import native, ops
from mlx_aim.cpu import portable as compiled_kernels
from mlx_aim.models.layers import Attention, prefix_causal_mask

LOWEST = np.finfo(np.float32).min


def attention_and_grads64(q, k, v, scale, keep, cotangent):
    """Attention in float64 (masked scores at the float32 minimum) and its gradients (q, k, v)."""
    q, k, v, g = (np.array(a, np.float64) for a in (q, k, v, cotangent))
    s = np.where(keep, scale * q @ k.swapaxes(-1, -2), LOWEST)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = g @ v.swapaxes(-1, -2)
    ds = np.where(keep, p * (dp - (dp * p).sum(-1, keepdims=True)), 0.0)
    return p @ v, (scale * ds @ k, scale * ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ g)


def masks(kind: str, b: int, n_q: int, n_k: int):
    """(mask for the kernel, boolean keep for float64) of one kind."""
    if kind == "none":
        return None, np.ones((n_q, n_k), bool)
    if kind == "prefix-causal":
        keep = np.array(prefix_causal_mask(mx.array(np.arange(b) * 3 % n_k + 1), n_k))
        keep[0, 0, -1] = False  # a fully masked row attends uniformly and passes no gradient
        return mx.array(keep), keep
    if kind == "shrinking":  # later rows attend fewer keys: no block is skipped
        keep = np.arange(n_q)[:, None] + np.arange(n_k)[None] < n_k
        return mx.array(keep), keep
    if kind == "random":  # blocks of rows whose last kept key moves back and forth
        keep = np.random.default_rng(0).random((n_q, n_k)) < 0.1
        return mx.array(keep), keep
    keep = np.arange(n_q)[:, None] + (n_k - n_q) >= np.arange(n_k)[None]
    return "causal", keep


CASES = [  # (B, H, Nq, Nk, d, mask): the trunk, odd widths and lengths, pooling, cross-attention
    (2, 3, 196, 196, 64, "prefix-causal"),
    (1, 2, 7, 7, 5, "prefix-causal"),
    (3, 2, 1, 50, 48, "none"),
    (2, 2, 10, 33, 80, "causal"),
    (1, 8, 65, 65, 128, "none"),
    (2, 2, 90, 90, 16, "causal"),
    (1, 2, 40, 40, 16, "shrinking"),
    (2, 1, 70, 70, 32, "random"),
    (2, 2, 16, 16, 8, "prefix-causal"),
    (1, 1, 12, 40, 24, "random"),
]


@pytest.mark.parametrize("b, h, n_q, n_k, d, kind", CASES, ids=str)
def test_attention_and_its_gradients_match_float64(kernels, b, h, n_q, n_k, d, kind):
    q, g = mx.random.normal((b, h, n_q, d)), mx.random.normal((b, h, n_q, d))
    k, v = mx.random.normal((b, h, n_k, d)) * 2, mx.random.normal((b, h, n_k, d))
    mask, keep = masks(kind, b, n_q, n_k)
    scale = d**-0.5
    array_mask = compiled_kernels.mask_array(mask, n_q, n_k) if mask is not None else None
    (out,), grads = mx.vjp(
        lambda q, k, v: kernels.attention(q, k, v, scale, array_mask), [q, k, v], [g]
    )
    expected, expected_grads = attention_and_grads64(q, k, v, scale, keep, g)
    assert_parity(out, expected, rel=2e-6, name="attention")
    for name, grad, reference in zip("qkv", grads, expected_grads, strict=True):
        assert_parity(grad, reference, rel=1e-5, name=f"d{name}")


def test_a_fully_masked_row_attends_uniformly_and_passes_no_query_gradient(kernels):
    q, k, v = (mx.random.normal((1, 1, 4, 8)) for _ in range(3))
    mask = mx.array(np.tril(np.ones((4, 4), bool)))
    mask[1] = False
    (out,), (dq, _, _) = mx.vjp(
        lambda q, k, v: kernels.attention(q, k, v, 0.5, mask), [q, k, v], [mx.ones(q.shape)]
    )
    assert_parity(out[0, 0, 1], v[0, 0].mean(0), rel=1e-6)
    assert mx.all(dq[0, 0, 1] == 0).item()


def test_strided_queries_keys_and_values_are_read_in_place(kernels):
    """The trunk's q, k, v are views of one (B, N, 3, H, d) projection: no copy changes them."""
    qkv = mx.random.normal((2, 9, 3, 2, 16)).transpose(2, 0, 3, 1, 4)
    q, k, v = (t.squeeze(0) for t in mx.split(qkv, 3))
    mask = prefix_causal_mask(mx.array([3, 6]), 9)
    strided = kernels.attention(q, k, v, 0.25, mask)
    packed = kernels.attention(*(mx.array(np.array(t)) for t in (q, k, v)), 0.25, mask)
    assert mx.array_equal(strided, packed).item()
    # last axis strided too (a transposed view): packed before use
    kt = mx.random.normal((2, 2, 16, 9)).swapaxes(-1, -2)
    assert mx.array_equal(
        kernels.attention(q, kt, v, 0.25), kernels.attention(q, mx.array(np.array(kt)), v, 0.25)
    ).item()


def test_attention_trains_inside_a_compiled_step_like_the_portable_kernels(kernels, monkeypatch):
    monkeypatch.setattr(native, "_state", {"module": kernels})
    monkeypatch.delenv("MLX_AIM_NATIVE", raising=False)
    layer = Attention(32, 4)
    x = mx.random.normal((3, 12, 32))
    mask = prefix_causal_mask(mx.array([2, 7, 12]), 12)

    def loss(params):
        layer.update(params)
        return (layer(x, mask) ** 2).sum()

    params = layer.trainable_parameters()
    with mx.stream(mx.cpu):
        value, grads = mx.compile(mx.value_and_grad(loss))(params)
        monkeypatch.setenv("MLX_AIM_NATIVE", "0")
        ref_value, ref_grads = mx.value_and_grad(loss)(params)
    assert_parity(value, ref_value, rel=1e-5)
    for name in ("qkv", "proj"):
        assert_parity(grads[name]["weight"], ref_grads[name]["weight"], rel=1e-5, name=name)


@pytest.mark.parametrize(
    "dtype, mask_kind, fused",
    [
        (mx.float32, "bool", True),
        (mx.float32, "causal", True),
        (mx.float32, "none", True),
        (mx.float32, "additive", False),  # its gradient would be the scores': the softmax kernel
        (mx.bfloat16, "bool", False),
    ],
)
def test_ops_attention_fuses_float32_with_boolean_or_no_mask(
    kernels, monkeypatch, dtype, mask_kind, fused
):
    monkeypatch.setattr(native, "_state", {"module": kernels})
    monkeypatch.delenv("MLX_AIM_NATIVE", raising=False)
    calls = []
    monkeypatch.setattr(
        compiled_kernels,
        "_fusable",
        lambda *args, real=compiled_kernels._fusable: calls.append(real(*args)) or calls[-1],
    )
    q, k, v = (mx.random.normal((2, 2, 6, 8)).astype(dtype) for _ in range(3))
    bool_mask = prefix_causal_mask(mx.array([2, 4]), 6)
    mask = {
        "bool": bool_mask,
        "causal": "causal",
        "none": None,
        "additive": mx.where(bool_mask, 0.0, -1e9),
    }[mask_kind]
    with mx.stream(mx.cpu):
        out = ops.attention(q, k, v, 0.3, mask)
    reference = mx.fast.scaled_dot_product_attention(
        q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), scale=0.3, mask=mask
    )
    assert calls == [fused]
    assert out.dtype == dtype
    assert_parity(out.astype(mx.float32), reference, rel=1e-5 if dtype == mx.float32 else 1e-2)
