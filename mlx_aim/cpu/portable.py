"""Exact GELU and softmax attention for MLX's CPU backend, at float32 accuracy.

MLX's CPU backend on x86 runs every elementwise op as a scalar, single-threaded loop and evaluates
``erf``/``exp`` with slow scalar code, which makes exact GELU and softmax the slowest non-matmul
parts of a CPU training step. These kernels are built from arithmetic that ``mx.compile`` fuses
into vectorized loops instead:

- ``0.5 erf(a / sqrt 2) = a P(a^2) / Q(a^2)`` with ``a = min(|x|, 4 sqrt 2)`` (degree 5 / 5, our
  own least-squares fit): GELU max abs error 1.0e-7 for ``|x| <= 1`` and 1.9e-7 |x| beyond, its
  gradient 2.2e-7 (``nn.gelu``: 1.4e-7, 1.7e-7 |x|, 2.4e-7);
- ``exp(y)``, ``y <= 0``: Cody-Waite reduction by ``ln 2``, a degree-6 Taylor polynomial and ``2^n``
  written into the exponent bits, max relative error 2.9e-7 (``mx.exp``: 3.8e-6); exp(-inf) = 0;
- hand-written vjps (GELU' = Phi(x) + x phi(x); softmax: ``p (g - sum(g p))``);
- attention as ``softmax(q k^T scale + mask) v`` over explicit scores, softmax in float32.

Half-precision inputs are computed in float32 and rounded back. The model reaches these only through
``mlx_aim.models.ops``, which picks them on the CPU for the dtypes in ``DTYPES``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import ModuleType

import mlx.core as mx

DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def _fit(name: str) -> tuple[float, ...]:
    """The coefficients ``name(c0, c1, ...)`` of ``csrc/erf_fit.inc``, the erf fit the native
    kernels compile in: one source for both."""
    text = (Path(__file__).parent / "csrc" / "erf_fit.inc").read_text()
    found = re.search(rf"^{name}\(([^)]*)\)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"{name} missing from erf_fit.inc")
    return tuple(float(c) for c in found.group(1).split(","))


# 0.5 erf(a / sqrt 2) = a P(a^2) / Q(a^2) for 0 <= a <= 4 sqrt 2 (our degree-5/5 least-squares
# fit of erf(z) = z p(z^2) / q(z^2) on |z| <= 4, rescaled); erf rounds to 1 beyond.
_HALF_ERF_P = _fit("HALF_ERF_P")
_ERF_Q = _fit("ERF_Q")
_ERF_END = 4.0 * math.sqrt(2.0)
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln 2 split so that n * _LN2_HI is exact for |n| < 2^9
_LN2_LO = 1.428606765330187e-06
_ROUND = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds a float32 to an integer
_EXP_TAYLOR = (1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720)
_INV_SQRT_2PI = 0.3989422804014327
_TINY = 1e-37


# How the code below suits mx.compile on the CPU: it fuses elementwise ops into C++ loops that the
# compiler vectorizes only without float comparisons, selects, float min/max or sqrt (plain
# arithmetic, abs, casts and integer max are fine), and it fuses at most 11 ops deep: a deeper
# constant is passed as a strided (unvectorized) input. ``mx.contiguous`` (free on contiguous
# data) ends a fused kernel where we choose.
_split = mx.contiguous


def _poly(coeffs: tuple[float, ...], t: mx.array) -> mx.array:
    """``sum_i coeffs[i] t^i`` by Estrin's scheme (a shallow graph)."""
    terms = [coeffs[i] + coeffs[i + 1] * t for i in range(0, len(coeffs) - 1, 2)]
    if len(coeffs) % 2:
        terms.append(mx.array(coeffs[-1], t.dtype))
    power = t
    while len(terms) > 1:
        power = power * power
        pairs = [terms[i] + power * terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        terms = pairs + ([terms[-1]] if len(terms) % 2 else [])
    return terms[0]


def _at_least(y: mx.array, low: float, bits: int) -> mx.array:
    """``max(y, low)`` for float32 ``y <= 0`` (-inf and NaN give ``low``), truncated to multiples
    of ``2^-bits``: float32 to int32 conversion saturates to INT_MIN, an integer max clamps."""
    scale = float(2**bits)
    clamped = mx.maximum((y * scale).astype(mx.int32), int(low * scale))
    return clamped.astype(mx.float32) * (1.0 / scale)


def _exp_parts(y: mx.array) -> tuple[mx.array, mx.array]:
    """``(r, 2^n)`` with ``exp(y) = exp(r) 2^n``, ``|r| <= ln(2) / 2``, for float32 ``y <= 0``;
    ``2^n`` is 0 for ``y <= -88`` (exp(-inf) = 0)."""
    y = _at_least(y, -88.0, 24)
    n = _split((y * _LOG2E + _ROUND) - _ROUND)
    r = _split((y - n * _LN2_HI) - n * _LN2_LO)
    return r, mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)


def _exp(y: mx.array) -> mx.array:
    """``exp(y)`` for float32 ``y <= 0``, max relative error 2.5e-7."""
    r, two_n = _exp_parts(y)
    return _poly(_EXP_TAYLOR, r) * two_n


def _half_erf(x: mx.array) -> mx.array:
    """``0.5 erf(|x| / sqrt 2)`` for float32 ``x``, max abs error 2e-7."""
    a = _split(-_at_least(-mx.abs(x), -_ERF_END, 28))
    s = a * a
    return a * _poly(_HALF_ERF_P, s) / _poly(_ERF_Q, s)


@mx.custom_function
def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU ``x Phi(x)``, computed in float32 and returned in ``x``'s dtype."""
    x32 = x.astype(mx.float32)
    return (0.5 * x32 + mx.abs(x32) * _half_erf(x32)).astype(x.dtype)  # x erf(x) = |x| erf(|x|)


@gelu.vjp
def _gelu_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    x32 = x.astype(mx.float32)
    cdf = 0.5 + _split(_half_erf(x32)) * (x32 / (mx.abs(x32) + _TINY))  # sign(x), 0 at 0
    slope = cdf + x32 * _exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
    return (cotangent.astype(mx.float32) * slope).astype(x.dtype)


@mx.custom_function
def _softmax(scores: mx.array) -> mx.array:
    e = _exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@_softmax.vjp
def _softmax_vjp(scores: mx.array, cotangent: mx.array, probs: mx.array) -> mx.array:
    return probs * (cotangent - (cotangent * probs).sum(axis=-1, keepdims=True))


def mask_array(mask: mx.array | str, n_q: int, n_k: int) -> mx.array:
    """``mask`` as an array for (N_q, N_k) scores: ``"causal"`` becomes a boolean one."""
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"attention mask must be 'causal', an array or None, got {mask!r}")
        mask = mx.arange(n_q)[:, None] + (n_k - n_q) >= mx.arange(n_k)[None]
    return mask


def _masked(scores: mx.array, mask: mx.array | str) -> mx.array:
    mask = mask_array(mask, *scores.shape[-2:])
    if mask.dtype == mx.bool_:
        # the finite minimum, as mx.fast does: a fully masked row attends uniformly, never NaN
        return mx.where(mask, scores, mx.finfo(scores.dtype).min)
    return scores + mask.astype(scores.dtype)


def _fusable(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | str | None) -> bool:
    """Whether the native fused attention takes these: float32 (B, H, N, d) arrays with the same
    batch, heads and width, and no mask, ``"causal"`` or a boolean one."""
    if any(a.dtype != mx.float32 or a.ndim != 4 for a in (q, k, v)):
        return False
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return False
    return mask is None or isinstance(mask, str) or mask.dtype == mx.bool_


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: mx.array | str | None = None,
    native: ModuleType | None = None,
) -> mx.array:
    """``softmax(q k^T * scale + mask) v`` over explicit scores, the softmax in float32.

    ``native``: the compiled kernels of :mod:`mlx_aim.cpu.native`, if built: their fused attention
    (float32, one head per thread, no scores in memory) for a boolean mask or none, else their
    masked softmax.
    """
    if native is not None and _fusable(q, k, v, mask):
        mask = None if mask is None else mask_array(mask, q.shape[2], k.shape[2])
        return native.attention(q, k, v, scale, mask)
    scores = ((q * scale) @ k.swapaxes(-1, -2)).astype(mx.float32)
    if native is not None:
        mask = None if mask is None else mask_array(mask, *scores.shape[-2:])
        return native.softmax(scores, mask).astype(v.dtype) @ v
    if mask is not None:
        scores = _masked(scores, mask)
    return _softmax(scores).astype(v.dtype) @ v
