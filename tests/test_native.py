"""Native CPU kernels (mlx_aim/cpu/native.py): exact math, gradients, masks, mx.compile, the
seam in ops.gelu/ops.attention/ops.layer_norm, and the fallback when they are off or cannot be
built."""

import logging
import math
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from parity import assert_parity
from test_ops import gelu64, gelu_slope64
from typer.testing import CliRunner

from mlx_aim.cpu import native, ops
from mlx_aim.cpu import portable as compiled_kernels
from mlx_aim.models.layers import layer_norm, prefix_causal_mask, rms_norm

LOWEST = np.finfo(np.float32).min


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has not tried the kernels yet, with an empty cache."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path))
    monkeypatch.delenv("MLX_AIM_NATIVE", raising=False)
    return tmp_path


def gelu_ref(x):
    return 0.5 * x * (1 + mx.erf(x / math.sqrt(2.0)))


@pytest.mark.parametrize("shape", [(7,), (3, 5, 13), (300, 257)], ids=str)  # last: 2 threads
def test_gelu_and_its_gradient_are_exact_to_float32(kernels, shape):
    x = mx.random.normal(shape) * 4
    g = mx.random.normal(shape)
    (y,), (dx,) = mx.vjp(kernels.gelu, [x], [g])
    x64, g64 = np.array(x, np.float64), np.array(g, np.float64)
    assert np.all(np.abs(np.array(y) - gelu64(x64)) <= 1e-6 * np.maximum(1.0, np.abs(x64)))
    assert_parity(dx, g64 * gelu_slope64(x64), rel=2e-6, name="gelu vjp")


def test_gelu_keeps_nan_and_the_exact_values_at_zero_and_far_out(kernels):
    x = np.array([np.nan, 0.0, -0.0, 1e30, -1e30], np.float32)
    (y,), (dx,) = mx.vjp(kernels.gelu, [mx.array(x)], [mx.ones(x.shape)])
    np.testing.assert_array_equal(np.array(y), [np.nan, 0.0, 0.0, x[3], 0.0])
    np.testing.assert_array_equal(np.array(dx), [np.nan, 0.5, 0.5, 1.0, 0.0])


def softmax64(scores, keep, additive):
    s = np.where(keep, np.array(scores, np.float64) + additive, LOWEST)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def softmax_vjp64(probs, cotangent, keep):
    g = np.array(cotangent, np.float64)
    return np.where(keep, probs * (g - (g * probs).sum(-1, keepdims=True)), 0.0)


def _mask(kind: str, shape: tuple[int, ...]):
    """(mask for the kernel, boolean keep, additive) of one kind for (B, H, N, N) scores."""
    b, _, n, _ = shape
    if kind == "none":
        return None, True, 0.0
    if kind == "prefix-causal":
        keep = np.array(prefix_causal_mask(mx.array(np.arange(b) % n), n))
        keep[0, 0, -1] = False  # a fully masked row comes out uniform (and gets no gradient)
        return mx.array(keep), keep, 0.0
    additive = np.where(np.tril(np.ones((n, n))) > 0, 0.0, -np.inf).astype(np.float32)
    additive[:, 0] = -3.0
    return mx.array(additive), True, additive


@pytest.mark.parametrize("kind", ["none", "prefix-causal", "additive"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (1, 2, 1, 1), (8, 6, 67, 67)], ids=str)
def test_softmax_and_its_gradient_match_float64(kernels, kind, shape):
    scores = mx.random.normal(shape) * 5
    cotangent = mx.random.normal(shape)
    mask, keep, additive = _mask(kind, shape)
    (probs,), (grad,) = mx.vjp(lambda s: kernels.softmax(s, mask), [scores], [cotangent])
    expected = softmax64(scores, keep, additive)
    assert_parity(probs, expected, rel=1e-6, name="softmax")
    assert_parity(grad, softmax_vjp64(expected, cotangent, keep), rel=1e-5, name="softmax vjp")


def test_additive_mask_gets_the_scores_gradient_summed_over_its_broadcast(kernels):
    scores, cotangent = mx.random.normal((2, 3, 4, 4)), mx.random.normal((2, 3, 4, 4))
    mask = mx.random.normal((4, 4))
    _, (d_scores, d_mask) = mx.vjp(kernels.softmax, [scores, mask], [cotangent])
    assert_parity(d_mask, d_scores.sum(axis=(0, 1)), rel=1e-6)


def test_kernels_work_inside_a_compiled_training_step(kernels):
    x = mx.random.normal((4, 9, 16))
    w = mx.random.normal((16, 16)) * 0.3
    mask = prefix_causal_mask(mx.array([2, 5, 0, 9]), 9)

    def loss(w, softmax, gelu):
        h = gelu(x @ w)
        scores = h @ h.swapaxes(-1, -2)
        return (softmax(scores[:, None], mask) * scores[:, None]).sum()

    def reference_softmax(s, m):
        return mx.softmax(mx.where(m, s, LOWEST), axis=-1)

    step = mx.compile(mx.value_and_grad(lambda w: loss(w, kernels.softmax, kernels.gelu)))
    value, grad = step(w)
    ref_value, ref_grad = mx.value_and_grad(lambda w: loss(w, reference_softmax, gelu_ref))(w)
    assert_parity(value, ref_value, rel=1e-5)
    assert_parity(grad, ref_grad, rel=1e-5)


def test_ops_use_the_kernels_on_the_cpu_and_the_portable_ones_when_off(kernels, monkeypatch):
    monkeypatch.setattr(native, "_state", {"module": kernels})
    monkeypatch.delenv("MLX_AIM_NATIVE", raising=False)
    x = mx.random.normal((64, 33)) * 3
    q, k, v = (mx.random.normal((2, 3, 7, 8)) for _ in range(3))
    mask = prefix_causal_mask(mx.array([1, 4]), 7)
    with mx.stream(mx.cpu):
        assert mx.array_equal(ops.gelu(x), kernels.gelu(x)).item()
        native_out = ops.attention(q, k, v, 0.5, mask)
        assert mx.array_equal(native_out, kernels.attention(q, k, v, 0.5, mask)).item()
        additive = mx.where(mask, 0.0, -1e9)  # no fused form: the native softmax
        scores = (q * 0.5) @ k.swapaxes(-1, -2)
        expected = kernels.softmax(scores, additive) @ v
        assert mx.array_equal(ops.attention(q, k, v, 0.5, additive), expected).item()

        monkeypatch.setenv("MLX_AIM_NATIVE", "0")
        assert native.native_kernels() is None
        assert mx.array_equal(ops.gelu(x), compiled_kernels.gelu(x)).item()
        portable_out = ops.attention(q, k, v, 0.5, mask)
    assert_parity(portable_out, native_out, rel=1e-6)


def layer_norm_and_grads64(x, weight, bias, cotangent, eps):
    """LayerNorm of the last axis in float64 and its gradients (x, weight, bias)."""
    x, weight, bias, g = (np.array(a, np.float64) for a in (x, weight, bias, cotangent))
    inv_std = 1 / np.sqrt(x.var(-1, keepdims=True) + eps)
    x_hat = (x - x.mean(-1, keepdims=True)) * inv_std
    gw = g * weight
    dx = inv_std * (gw - gw.mean(-1, keepdims=True) - x_hat * (gw * x_hat).mean(-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    return x_hat * weight + bias, (dx, (g * x_hat).sum(rows), g.sum(rows))


def _layer_norm_inputs(shape, offset):
    x = mx.random.normal(shape) * 3 + offset
    return x, mx.random.normal(shape[-1:]), mx.random.normal(shape[-1:]), mx.random.normal(shape)


# (301, 257): 301 rows split unevenly over 2 threads, 257 not a multiple of any vector width
@pytest.mark.parametrize("shape", [(7,), (3, 5, 13), (301, 257)], ids=str)
def test_layer_norm_and_its_gradients_match_float64_and_mlx(kernels, shape):
    x, weight, bias, cotangent = _layer_norm_inputs(shape, offset=1.0)
    (y,), grads = mx.vjp(lambda *a: kernels.layer_norm(*a, 1e-6), [x, weight, bias], [cotangent])
    expected, expected_grads = layer_norm_and_grads64(x, weight, bias, cotangent, 1e-6)
    (mlx_y,), mlx_grads = mx.vjp(
        lambda *a: mx.fast.layer_norm(*a, 1e-6), [x, weight, bias], [cotangent]
    )
    assert_parity(y, expected, rel=2e-6, name="layer_norm")
    assert_parity(y, mlx_y, rel=5e-6, name="layer_norm vs mx.fast")
    names = ("dx", "dweight", "dbias")
    for name, grad, grad64, mlx_grad in zip(names, grads, expected_grads, mlx_grads, strict=True):
        assert_parity(grad, grad64, rel=1e-5, name=name)
        assert_parity(grad, mlx_grad, rel=1e-5, name=f"{name} vs mx.fast")


def rms_norm_and_grads64(x, weight, cotangent, eps):
    """RMSNorm of the last axis in float64 and its gradients (x, weight)."""
    x, weight, g = (np.array(a, np.float64) for a in (x, weight, cotangent))
    inv_rms = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    x_hat = x * inv_rms
    gw = g * weight
    dx = inv_rms * (gw - x_hat * (gw * x_hat).mean(-1, keepdims=True))
    return x_hat * weight, (dx, (g * x_hat).sum(tuple(range(x.ndim - 1))))


@pytest.mark.parametrize("shape", [(7,), (3, 5, 13), (301, 257)], ids=str)
def test_rms_norm_and_its_gradients_match_float64_and_mlx(kernels, shape):
    x, weight, _, cotangent = _layer_norm_inputs(shape, offset=1.0)
    (y,), grads = mx.vjp(lambda *a: kernels.rms_norm(*a, 1e-5), [x, weight], [cotangent])
    expected, expected_grads = rms_norm_and_grads64(x, weight, cotangent, 1e-5)
    (mlx_y,), mlx_grads = mx.vjp(lambda *a: mx.fast.rms_norm(*a, 1e-5), [x, weight], [cotangent])
    assert_parity(y, expected, rel=2e-6, name="rms_norm")
    assert_parity(y, mlx_y, rel=5e-6, name="rms_norm vs mx.fast")
    for name, grad, grad64, mlx_grad in zip(
        ("dx", "dweight"), grads, expected_grads, mlx_grads, strict=True
    ):
        assert_parity(grad, grad64, rel=1e-5, name=name)
        assert_parity(grad, mlx_grad, rel=1e-5, name=f"{name} vs mx.fast")


def test_layer_norm_variance_is_sound_far_from_zero(kernels):
    # a mean of 1000 rounds by 6e-5, 2e-5 of the spread; E[x^2] - E[x]^2 would be off by 3e-3
    x, weight, bias, _ = _layer_norm_inputs((64, 96), offset=1000.0)
    expected, _ = layer_norm_and_grads64(x, weight, bias, mx.zeros_like(x), 1e-6)
    assert_parity(kernels.layer_norm(x, weight, bias, 1e-6), expected, rel=1e-4)


def test_layer_norm_works_compiled_and_checkpointed(kernels):
    x = mx.random.normal((5, 11, 24))
    weight, bias = mx.random.normal((24,)), mx.random.normal((24,))
    proj = mx.random.normal((24, 24)) * 0.3

    def loss(norm, x, weight, bias):
        h = norm(x @ proj, weight, bias, 1e-5)
        return (norm(h * h, weight, bias, 1e-5) * x).sum()

    step = mx.compile(
        mx.value_and_grad(mx.checkpoint(lambda *a: loss(kernels.layer_norm, *a)), argnums=(0, 1, 2))
    )
    value, grads = step(x, weight, bias)
    reference = mx.value_and_grad(lambda *a: loss(mx.fast.layer_norm, *a), argnums=(0, 1, 2))
    ref_value, ref_grads = reference(x, weight, bias)
    assert_parity(value, ref_value, rel=1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_parity(grad, ref_grad, rel=1e-5)


def test_rms_norm_works_compiled_and_checkpointed(kernels):
    x, weight = mx.random.normal((5, 11, 24)), mx.random.normal((24,))
    proj = mx.random.normal((24, 24)) * 0.3

    def loss(norm, x, weight):
        h = norm(x @ proj, weight, 1e-5)
        return (norm(h * h, weight, 1e-5) * x).sum()

    step = mx.compile(
        mx.value_and_grad(mx.checkpoint(lambda *a: loss(kernels.rms_norm, *a)), argnums=(0, 1))
    )
    value, grads = step(x, weight)
    ref_value, ref_grads = mx.value_and_grad(lambda *a: loss(mx.fast.rms_norm, *a), argnums=(0, 1))(
        x, weight
    )
    assert_parity(value, ref_value, rel=1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_parity(grad, ref_grad, rel=1e-5)


def test_rms_norm_module_is_native_for_float32_only(kernels, monkeypatch):
    monkeypatch.setattr(native, "_state", {"module": kernels})
    monkeypatch.delenv("MLX_AIM_NATIVE", raising=False)
    norm = rms_norm(33)
    norm.update({"weight": mx.random.normal((33,))})
    assert [k for k, _ in tree_flatten(norm.parameters())] == ["weight"]
    x = mx.random.normal((4, 9, 33)) * 2
    with mx.stream(mx.cpu):
        assert mx.array_equal(norm(x), kernels.rms_norm(x, norm.weight, 1e-5)).item()
        norm.set_dtype(mx.bfloat16)
        x_half = x.astype(mx.bfloat16)
        expected = mx.fast.rms_norm(x_half, norm.weight, 1e-5)
        assert mx.array_equal(norm(x_half), expected).item()


def test_layer_norm_module_is_native_for_float32_only(kernels, monkeypatch):
    monkeypatch.setattr(native, "_state", {"module": kernels})
    monkeypatch.delenv("MLX_AIM_NATIVE", raising=False)
    norm = layer_norm(33)
    norm.update({"weight": mx.random.normal((33,)), "bias": mx.random.normal((33,))})
    assert sorted(k for k, _ in tree_flatten(norm.parameters())) == ["bias", "weight"]
    x = mx.random.normal((4, 9, 33)) * 2
    with mx.stream(mx.cpu):
        native_out = norm(x)
        assert mx.array_equal(
            native_out, kernels.layer_norm(x, norm.weight, norm.bias, 1e-6)
        ).item()
        half = layer_norm(33)
        half.update(norm.parameters())
        half.set_dtype(mx.bfloat16)
        x_half = x.astype(mx.bfloat16)
        expected = mx.fast.layer_norm(x_half, half.weight, half.bias, 1e-6)
        assert mx.array_equal(half(x_half), expected).item()

        monkeypatch.setenv("MLX_AIM_NATIVE", "0")
        off_out = norm(x)
        assert mx.array_equal(off_out, mx.fast.layer_norm(x, norm.weight, norm.bias, 1e-6)).item()
    assert_parity(off_out, native_out, rel=1e-6)


def test_off_switch_and_status(fresh, monkeypatch):
    monkeypatch.setenv("MLX_AIM_NATIVE", "0")
    assert native.native_kernels() is None
    assert native.native_status() == "off (MLX_AIM_NATIVE=0)"
    assert native._state == {}  # nothing was tried: no build, no warning


def test_without_a_compiler_one_line_says_so_and_the_portable_kernels_run(
    fresh, monkeypatch, caplog
):
    if native.unavailable_reason():
        pytest.skip(native.unavailable_reason())
    monkeypatch.setenv("PATH", str(fresh))  # an empty directory: no cmake, no compiler
    monkeypatch.delenv("CXX", raising=False)
    assert "a C++ compiler" in native.native_status()
    x = mx.random.normal((16, 16))
    with caplog.at_level(logging.WARNING, logger="mlx_aim"), mx.stream(mx.cpu):
        y = ops.gelu(x)
        ops.gelu(x)
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]  # one warning, one line
    assert "a C++ compiler" in caplog.text and "pip install 'mlx-aim[native]'" in caplog.text
    assert mx.array_equal(y, compiled_kernels.gelu(x)).item()
    assert not any(fresh.rglob("*.so"))


def test_a_failed_build_is_reported_once_and_not_retried_until_asked(fresh, monkeypatch, caplog):
    if native.unavailable_reason():
        pytest.skip(native.unavailable_reason())
    monkeypatch.setattr(native, "missing_build_tools", lambda: [])

    def failing_compile(build_dir: Path) -> Path:
        raise native.NativeBuildError("their build failed: boom", log="LOG")

    monkeypatch.setattr(native, "_compile", failing_compile)
    with caplog.at_level(logging.WARNING, logger="mlx_aim"):
        assert native.native_kernels() is None
    assert "failed: boom" in caplog.text
    log = native._failure_log()
    assert "LOG" in log.read_text()
    assert native.native_status() == f"off (the build failed, see {log})"

    monkeypatch.setattr(native, "_state", {})  # the next process does not build again
    monkeypatch.setattr(native, "_compile", lambda build_dir: pytest.fail("rebuilt"))
    assert native.native_kernels() is None
    with pytest.raises(pytest.fail.Exception, match="rebuilt"):  # build-kernels retries
        native.build_kernels(force=True)
    assert not list(log.parent.glob("build-*"))  # temporary build directories are removed


def test_an_unwritable_cache_turns_the_kernels_off_with_one_line(fresh, monkeypatch, caplog):
    if native.unavailable_reason():
        pytest.skip(native.unavailable_reason())
    monkeypatch.setattr(native, "missing_build_tools", lambda: [])
    not_a_directory = fresh / "file"
    not_a_directory.write_text("")
    monkeypatch.setenv("MLX_AIM_CACHE", str(not_a_directory))
    with caplog.at_level(logging.WARNING, logger="mlx_aim"):
        assert native.native_kernels() is None
    assert len(caplog.records) == 1 and "native CPU kernels off" in caplog.text


def test_concurrent_builds_each_put_a_whole_module_in_place(fresh, monkeypatch):
    monkeypatch.setattr(native, "missing_build_tools", lambda: [])
    monkeypatch.setattr(native, "_check_nanobind_abi", lambda built: None)
    both_building = threading.Barrier(2, timeout=10)

    def fake_compile(build_dir: Path) -> Path:
        both_building.wait()
        built = build_dir / "mlx_aim_kernels.so"
        built.write_bytes(b"module" * 1000)
        return built

    monkeypatch.setattr(native, "_compile", fake_compile)
    builders = [threading.Thread(target=native.build_kernels) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    assert native.module_path().read_bytes() == b"module" * 1000
    assert sorted(p.name for p in native.module_path().parent.iterdir()) == [
        native.module_path().name
    ]


def test_a_module_built_with_another_nanobind_abi_is_refused(tmp_path):
    foreign = tmp_path / "foreign.so"
    foreign.write_bytes(b"\0nanobind_gcc_libstdcpp_cxxabi1018_a1_v15\0")
    if native._nanobind_key(Path(mx.__file__)) is None:
        pytest.skip("this MLX build shows no nanobind ABI key")
    with pytest.raises(native.NativeBuildError, match="install the nanobind version mlx was"):
        native._check_nanobind_abi(foreign)


def test_build_kernels_command_reports_one_line(fresh, monkeypatch):
    import typer
    from mlx_aim_cli.kernels import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps build-kernels a sub-command
    monkeypatch.setenv("MLX_AIM_NATIVE", "0")
    result = CliRunner().invoke(app, ["build-kernels"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: native CPU kernels do not apply here (MLX_AIM_NATIVE=0)"
    ]


def silu_gate_and_grads64(gate, value, cotangent):
    a, b, g = (np.array(t, np.float64) for t in (gate, value, cotangent))
    sig = 1 / (1 + np.exp(-a))
    return a * sig * b, (g * b * sig * (1 + a * (1 - sig)), g * a * sig)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 13), (256, 2816)], ids=str)  # last: 2 threads
def test_silu_gate_and_its_gradients_match_float64(kernels, shape):
    gate, value, g = mx.random.normal(shape) * 6, mx.random.normal(shape), mx.random.normal(shape)
    (out,), grads = mx.vjp(kernels.silu_gate, [gate, value], [g])
    expected, expected_grads = silu_gate_and_grads64(gate, value, g)
    assert_parity(out, expected, rel=1e-6, name="silu gate")
    for name, grad, reference in zip(("gate", "value"), grads, expected_grads, strict=True):
        assert_parity(grad, reference, rel=1e-6, name=f"d {name}")


def test_silu_gate_is_exact_far_out_and_keeps_nan(kernels):
    gate = mx.array([np.nan, 0.0, 100.0, -100.0, 3e38, -3e38], mx.float32)
    out = kernels.silu_gate(gate, mx.ones(gate.shape))
    expected = np.array([np.nan, 0.0, 100.0, 0.0, 3e38, 0.0], np.float32)
    np.testing.assert_array_equal(np.array(out), expected)


def test_swiglu_uses_the_native_gate_for_float32_only(kernels, monkeypatch):
    from mlx_aim.models.layers import SwiGLU

    monkeypatch.setattr(native, "_state", {"module": kernels})
    monkeypatch.delenv("MLX_AIM_NATIVE", raising=False)
    mlp, x = SwiGLU(16, 40), mx.random.normal((2, 5, 16))
    with mx.stream(mx.cpu):
        out = mlp(x)
        gate, value = mlp.fc1(x), mlp.fc3(x)
        assert mx.array_equal(out, mlp.fc2(kernels.silu_gate(gate, value))).item()
        assert_parity(out, mlp.fc2(mx.sigmoid(gate) * gate * value), rel=1e-6)
        half = ops.silu_gate(gate.astype(mx.bfloat16), value.astype(mx.bfloat16))  # MLX's ops
    assert half.dtype == mx.bfloat16
