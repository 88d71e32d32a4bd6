"""The native kernels' cache (mlx_aim/cpu/native.py) loads only what its own build produced: a
module planted at its path, random bytes, an empty file, or a cache that another user owns or
may write fall back to the portable kernels with one warning; ``build-kernels`` builds again."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from mlx_aim_cli.kernels import register
from typer.testing import CliRunner

from mlx_aim.cpu import native

NOT_A_MODULE = b"\x7fELF" + os.urandom(4000)
PLANTED_SOURCE = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w"); if (f) { fputs("ran", f); fclose(f); }
}
"""


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has not tried the kernels, an empty private cache and a fake compiler."""
    if native.unavailable_reason():
        pytest.skip(native.unavailable_reason())
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLX_AIM_NATIVE", raising=False)
    monkeypatch.setattr(native, "missing_build_tools", lambda: [])
    monkeypatch.setattr(native, "_check_nanobind_abi", lambda built: None)
    return tmp_path


def fake_compile(build_dir: Path) -> Path:
    built = build_dir / "mlx_aim_kernels.so"
    built.write_bytes(b"built by the build" * 100)
    return built


def plant(data: bytes) -> Path:
    target = native.module_path()
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def kernels_with_one_warning(caplog) -> str:
    with caplog.at_level(logging.WARNING, logger="mlx_aim"):
        assert native.native_kernels() is None
        assert native.native_kernels() is None  # asked again: no second warning
    assert len(caplog.records) == 1 and "native CPU kernels off" in caplog.text
    return caplog.text


def test_a_planted_shared_library_is_never_loaded(fresh, caplog):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a planted library")
    marker = fresh / "constructor-ran"
    source = fresh / "planted.c"
    source.write_text(PLANTED_SOURCE % marker)
    library = fresh / "planted.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", library, source], check=True)
    plant(library.read_bytes())
    assert "no record of its build" in kernels_with_one_warning(caplog)
    assert not marker.exists()


@pytest.mark.parametrize("data", [NOT_A_MODULE, b""], ids=["random-bytes", "empty"])
def test_random_bytes_or_an_empty_file_fall_back_with_one_warning(fresh, caplog, data):
    plant(data)
    kernels_with_one_warning(caplog)
    assert native.native_status().startswith("off (")


def test_a_module_that_verifies_but_does_not_load_falls_back(fresh, monkeypatch):
    monkeypatch.setattr(native, "_compile", fake_compile)
    native.build_kernels()
    # a new process: this one may hold the real module already (Python caches extension modules)
    probe = "from mlx_aim.cpu import native; print(native.native_kernels())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "None"
    (warning,) = done.stderr.strip().splitlines()
    assert warning.startswith("native CPU kernels off:") and "does not load" in warning


def test_a_module_swapped_after_its_build_is_not_loaded(fresh, monkeypatch, caplog):
    monkeypatch.setattr(native, "_compile", fake_compile)
    target = native.build_kernels()
    target.write_bytes(NOT_A_MODULE)
    assert "its sha256 differs" in kernels_with_one_warning(caplog)


def test_build_kernels_builds_over_a_planted_file(fresh, monkeypatch):
    monkeypatch.setattr(native, "_compile", fake_compile)
    target = plant(NOT_A_MODULE)
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps build-kernels a sub-command
    result = CliRunner().invoke(app, ["build-kernels"])
    assert result.exit_code == 0, result.output
    assert target.read_bytes() == b"built by the build" * 100
    assert native._verifies(target)


def test_a_cache_folder_other_users_may_write_is_not_used_until_rebuilt(fresh, monkeypatch, caplog):
    monkeypatch.setattr(native, "_compile", fake_compile)
    target = native.build_kernels()
    target.parent.chmod(0o777)
    assert "writable by other users" in kernels_with_one_warning(caplog)
    native.build_kernels()  # builds again, and makes the folder (this user's) private
    assert target.parent.stat().st_mode & 0o777 == 0o755 and native._verifies(target)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
@pytest.mark.parametrize("what", ["module", "digest", "folder"])
def test_a_cache_file_or_folder_of_another_user_is_not_used(fresh, monkeypatch, caplog, what):
    monkeypatch.setattr(native, "_compile", fake_compile)
    target = native.build_kernels()
    owned = {"module": target, "digest": native._digest_path(target), "folder": target.parent}
    os.chown(owned[what], 65534, 65534)
    assert "belongs to another user" in kernels_with_one_warning(caplog)
    if what == "folder":
        with pytest.raises(native.NativeBuildError, match="belongs to another user"):
            native.build_kernels()
