"""GELU, SwiGLU's gate, attention, the norms and the optimizer's update: the backend-dependent
ops, same math everywhere.

GPU backends (Metal, CUDA) run MLX's fused ``nn.gelu``, ``mx.fast.scaled_dot_product_attention``,
``mx.fast.layer_norm`` and ``mx.fast.rms_norm``. On the CPU, where those are slow scalar loops,
the native C++ kernels of ``mlx_aim.cpu.native`` run where they could be built (Linux, float32):
GELU, SwiGLU's ``silu(gate) * value``, attention, the norms, and the optimizer's AdamW update and
gradient norm (``adamw_kernels``, ``sum_of_squares``); else the float32-accurate compiled kernels
of ``mlx_aim.cpu.portable`` (GELU, attention) or MLX's ops. Set ``MLX_AIM_CPU_KERNELS=0`` to use
MLX's ops on every backend (``MLX_AIM_FAST_MATH``, its former name, still works); float64 inputs
always do. The choice is made when an op is called, so
a compiled function keeps the one made while it was traced.
"""

from __future__ import annotations

from types import ModuleType

import mlx.core as mx
import mlx.nn as nn

from ..env import env_flag
from . import portable
from .native import native_kernels

ENV_VAR = "MLX_AIM_CPU_KERNELS"
OLD_ENV_VAR = "MLX_AIM_FAST_MATH"  # its former name, still read when ENV_VAR is unset


def cpu_kernels_enabled(x: mx.array | None = None) -> bool:
    """Whether the CPU kernels apply: CPU default device, ``MLX_AIM_CPU_KERNELS`` not off, and
    (when given) ``x`` is float32, float16 or bfloat16."""
    if not env_flag(ENV_VAR, old_name=OLD_ENV_VAR):
        return False
    if x is not None and x.dtype not in portable.DTYPES:
        return False
    return mx.default_device() == mx.cpu


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, ``x Phi(x)``."""
    if not cpu_kernels_enabled(x):
        return nn.gelu(x)
    native = native_kernels() if x.dtype == mx.float32 else None
    return native.gelu(x) if native is not None else portable.gelu(x)


def silu_gate(gate: mx.array, value: mx.array) -> mx.array:
    """``silu(gate) * value``, SwiGLU's activation."""
    if gate.dtype == value.dtype == mx.float32 and gate.shape == value.shape:
        native = native_kernels() if cpu_kernels_enabled(gate) else None
        if native is not None:
            return native.silu_gate(gate, value)
    return nn.silu(gate) * value


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None = None
) -> mx.array:
    """``softmax(q k^T * scale + mask) v`` for (B, H, N, d) queries, keys and values.

    ``mask``: None, ``"causal"``, a boolean array (True = attend) or an additive array,
    broadcastable to (B, H, N_q, N_k).
    """
    if cpu_kernels_enabled(q):
        return portable.attention(q, k, v, scale, mask, native=native_kernels())
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def layer_norm(x: mx.array, weight: mx.array | None, bias: mx.array | None, eps: float) -> mx.array:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    affine = weight is not None and bias is not None
    if affine and cpu_kernels_enabled(x) and x.dtype == weight.dtype == bias.dtype == mx.float32:
        native = native_kernels()
        if native is not None:
            return native.layer_norm(x, weight, bias, eps)
    return mx.fast.layer_norm(x, weight, bias, eps)


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * weight``."""
    if weight is not None and cpu_kernels_enabled(x) and x.dtype == weight.dtype == mx.float32:
        native = native_kernels()
        if native is not None:
            return native.rms_norm(x, weight, eps)
    return mx.fast.rms_norm(x, weight, eps)


def sum_of_squares(x: mx.array) -> mx.array:
    """``sum(x^2)`` as a float32 scalar (a term of a gradient norm)."""
    x32 = x.astype(mx.float32)
    native = native_kernels() if cpu_kernels_enabled(x32) else None
    return native.sum_of_squares(x32) if native is not None else x32.square().sum()


def adamw_kernels(*arrays: mx.array) -> ModuleType | None:
    """The native kernels when an AdamW update of these arrays can run there (CPU, all float32,
    kernels built; their ``adamw_update`` is bit-equal to ``mlx.optimizers.AdamW``), else None."""
    if not all(a.dtype == mx.float32 for a in arrays) or not cpu_kernels_enabled():
        return None
    return native_kernels()
