"""The environment switches and the cache folder, read in one place (``mlx_aim.env``)."""

from pathlib import Path

import mlx.core as mx
import pytest

from mlx_aim.cpu import blas, ops, toolchain
from mlx_aim.env import cache_root, env_flag


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no ", "None"])
def test_every_off_spelling_turns_a_switch_off(monkeypatch, value):
    monkeypatch.setenv("MLX_AIM_TEST_SWITCH", value)
    assert env_flag("MLX_AIM_TEST_SWITCH") is False


@pytest.mark.parametrize("value", ["1", "yes", "on", "/usr/lib/libopenblas.so.0"])
def test_any_other_value_turns_a_switch_on(monkeypatch, value):
    monkeypatch.setenv("MLX_AIM_TEST_SWITCH", value)
    assert env_flag("MLX_AIM_TEST_SWITCH", default=False) is True


@pytest.mark.parametrize("value", [None, "", "  "])
def test_an_unset_or_blank_switch_takes_its_default(monkeypatch, value):
    monkeypatch.delenv("MLX_AIM_TEST_SWITCH", raising=False)
    if value is not None:
        monkeypatch.setenv("MLX_AIM_TEST_SWITCH", value)
    assert env_flag("MLX_AIM_TEST_SWITCH") is True
    assert env_flag("MLX_AIM_TEST_SWITCH", default=False) is False


def test_the_former_name_of_a_switch_is_read_only_when_the_new_one_is_unset(monkeypatch):
    monkeypatch.delenv("MLX_AIM_CPU_KERNELS", raising=False)
    monkeypatch.setenv("MLX_AIM_FAST_MATH", "0")
    assert not ops.cpu_kernels_enabled()
    monkeypatch.setenv("MLX_AIM_CPU_KERNELS", "1")
    assert ops.cpu_kernels_enabled() == (mx.default_device() == mx.cpu)


def test_the_native_and_blas_switches_agree_on_off(monkeypatch):
    for value in ("none", "False"):
        monkeypatch.setenv(toolchain.ENV_VAR, value)
        monkeypatch.setenv(blas.ENV_VAR, value)
        assert toolchain.switched_off()
        assert not env_flag(blas.ENV_VAR)


def test_the_cache_folder_is_mlx_aim_cache_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.setenv("MLX_AIM_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "mlx-aim"


def test_features_datasets_and_native_kernels_share_the_cache_folder(monkeypatch, tmp_path):
    from mlx_aim.cpu.native import module_path
    from mlx_aim.data.builtin import cache_dir
    from mlx_aim.tasks.features import default_cache_dir

    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path))
    for path in (default_cache_dir(), cache_dir(), module_path()):
        assert Path(path).is_relative_to(tmp_path)
