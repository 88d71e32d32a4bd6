"""mlx_aim.cpu.memory: on the CPU backend, MLX keeps freed buffers for reuse as Metal does."""

import mlx.core as mx
import pytest

from mlx_aim.cpu.memory import MLX_DEFAULT_CPU_CACHE_LIMIT, reuse_freed_buffers


@pytest.fixture
def default_cache_limit():
    """The CPU device with MLX's default cache limit for the test, whatever was before put back."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    previous = mx.set_cache_limit(MLX_DEFAULT_CPU_CACHE_LIMIT)
    yield
    mx.set_cache_limit(previous)
    mx.set_default_device(device)


def test_the_cache_limit_rises_from_mlx_default_to_a_quarter_of_the_memory_limit(
    default_cache_limit,
):
    memory_limit = mx.set_memory_limit(1 << 40)
    mx.set_memory_limit(memory_limit)
    limit = reuse_freed_buffers()
    assert limit == max(MLX_DEFAULT_CPU_CACHE_LIMIT, memory_limit // 4)
    assert mx.set_cache_limit(limit) == limit


def test_freed_buffers_are_reused_instead_of_returned(default_cache_limit):
    reuse_freed_buffers()
    mx.clear_cache()
    x = mx.ones((4096, 4096))  # 64 MiB: more than MLX's default cache keeps
    mx.eval(x * 2)
    assert mx.get_cache_memory() >= x.nbytes


def test_a_limit_the_program_chose_is_kept(default_cache_limit):
    mx.set_cache_limit(123 << 20)
    assert reuse_freed_buffers() is None
    assert mx.set_cache_limit(123 << 20) == 123 << 20


def test_other_backends_are_left_alone(default_cache_limit, monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert reuse_freed_buffers() is None
    assert mx.set_cache_limit(MLX_DEFAULT_CPU_CACHE_LIMIT) == MLX_DEFAULT_CPU_CACHE_LIMIT


@pytest.mark.parametrize("mib", [0, 32, 300])
def test_the_environment_sets_how_many_mib_of_freed_buffers_to_keep(
    default_cache_limit, monkeypatch, mib
):
    monkeypatch.setenv("MLX_AIM_CPU_CACHE_MB", str(mib))
    assert reuse_freed_buffers() == mib << 20
    assert mx.set_cache_limit(MLX_DEFAULT_CPU_CACHE_LIMIT) == mib << 20


def test_auto_or_an_unreadable_setting_keeps_a_quarter_of_the_memory_limit(
    default_cache_limit, monkeypatch, caplog
):
    memory_limit = mx.set_memory_limit(1 << 40)
    mx.set_memory_limit(memory_limit)
    for value in ("auto", "lots"):
        monkeypatch.setenv("MLX_AIM_CPU_CACHE_MB", value)
        mx.set_cache_limit(MLX_DEFAULT_CPU_CACHE_LIMIT)
        assert reuse_freed_buffers() == max(MLX_DEFAULT_CPU_CACHE_LIMIT, memory_limit // 4)
    assert "MLX_AIM_CPU_CACHE_MB='lots'" in caplog.text
