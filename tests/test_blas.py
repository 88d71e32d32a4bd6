"""mlx_aim.cpu.blas: which BLAS serves MLX's CPU matmuls. Each case runs in a fresh interpreter,
because the choice is made once, before ``mlx.core`` is imported."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "apt-get install libopenblas0-pthread, or pip install 'mlx-aim[fast-cpu]'"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or any(glob.glob(os.path.join(p, "mlx_cuda*.dist-info")) for p in sys.path),
    reason="mlx_aim.cpu.blas only acts on Linux with a CPU build of MLX",
)

# Reports, as JSON on the last line: the chosen BLAS, the library that the process's global
# symbol scope (which MLX's sgemm calls bind to) resolves sgemm to, and the BLAS files mapped.
REPORT = """
import ctypes, dataclasses, json, os, re
import mlx.core
from mlx_aim.cpu.blas import blas_info, enable_fast_blas
enable_fast_blas()
class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]
provider = None
for symbol in ("cblas_sgemm", "sgemm_"):
    if provider is None and hasattr(ctypes.CDLL(None), symbol):
        found = DlInfo()
        address = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p)
        ctypes.CDLL(None).dladdr(address, ctypes.byref(found))
        provider = os.path.realpath(found.fname.decode())
maps = {line.split()[-1] for line in open("/proc/self/maps") if "/" in line}
info = blas_info()
print(json.dumps({
    "info": dataclasses.asdict(info) if info else None,
    "provider": provider,
    "mapped": sorted(p for p in maps if re.match(r"lib(openblas|mkl_rt|blis)", os.path.basename(p))),
}))
"""

MATMULS = """
import sys
import numpy as np
import mlx_aim
import mlx.core as mx
rng = np.random.default_rng(0)
a, b = rng.standard_normal((96, 700)), rng.standard_normal((700, 130))
at, x, w = rng.standard_normal((700, 96)), rng.standard_normal((4, 50, 64)), rng.standard_normal((64, 48))
a, b, at, x, w = (mx.array(v.astype(np.float32)) for v in (a, b, at, x, w))
np.savez(sys.argv[1], ab=np.array(a @ b), atb=np.array(at.T @ b), xw=np.array(x @ w))
"""


def _run(code: str, *args: str, setting: str | None = None, first: str = "") -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_AIM_BLAS")}
    if setting is not None:
        env["MLX_AIM_BLAS"] = setting
    prelude = "import logging\nlogging.basicConfig(level=logging.INFO)\n" + first
    done = subprocess.run(
        [sys.executable, "-c", prelude + code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines else {}), done.stderr


@pytest.fixture(scope="module")
def found() -> dict:
    """The optimized BLAS that mlx_aim picks on this machine by default."""
    report, log = _run("import mlx_aim\n" + REPORT)
    if report["info"] is None:
        pytest.skip(f"no optimized BLAS on this machine ({INSTALL_HINT})")
    return {**report, "log": log}


def test_off_keeps_the_bundled_blas():
    report, log = _run("import mlx_aim\n" + REPORT, setting="off")
    assert report["info"] is None
    assert report["mapped"] == []
    assert "MLX_AIM_BLAS=off" in log and "WARNING" not in log


def test_unloadable_path_warns_and_keeps_the_bundled_blas():
    report, log = _run("import mlx_aim\n" + REPORT, setting="/nonexistent/libnoblas.so")
    assert report["info"] is None
    assert report["mapped"] == []
    assert "WARNING" in log and "/nonexistent/libnoblas.so" in log


def test_importing_mlx_first_warns_how_to_fix_it():
    report, log = _run(REPORT, first="import mlx.core\nimport mlx_aim\n")
    assert report["info"] is None
    assert "import mlx_aim first" in log and "LD_PRELOAD" in log


def test_chosen_blas_serves_mlx_and_is_reported_once(found):
    assert found["info"]["name"] in {"OpenBLAS", "MKL", "BLIS"}
    assert found["provider"] == found["info"]["path"]
    announcements = [line for line in found["log"].splitlines() if "MLX CPU BLAS:" in line]
    assert len(announcements) == 1 and found["info"]["path"] in announcements[0]


def test_explicit_path_is_used(found):
    report, _ = _run("import mlx_aim\n" + REPORT, setting=found["info"]["path"])
    assert report["info"] == {**found["info"], "source": "MLX_AIM_BLAS"}
    assert report["provider"] == found["info"]["path"]


def test_matmuls_match_the_bundled_blas_to_fp32_rounding(found, tmp_path):
    _run(MATMULS, str(tmp_path / "fast.npz"))
    _run(MATMULS, str(tmp_path / "reference.npz"), setting="off")
    fast, reference = np.load(tmp_path / "fast.npz"), np.load(tmp_path / "reference.npz")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((96, 700)), rng.standard_normal((700, 130))
    at, x, w = (
        rng.standard_normal((700, 96)),
        rng.standard_normal((4, 50, 64)),
        rng.standard_normal((64, 48)),
    )
    operands = {"ab": (a, b), "atb": (at.T, b), "xw": (x, w)}
    for key, (left, right) in operands.items():
        left, right = (
            left.astype(np.float32).astype(np.float64),
            right.astype(np.float32).astype(np.float64),
        )
        # Each result is within K * eps * (|A| @ |B|) of the exact product, so they are within twice that.
        bound = 2 * left.shape[-1] * np.finfo(np.float32).eps * (np.abs(left) @ np.abs(right))
        assert np.all(np.abs(fast[key] - reference[key]) <= bound), key
        assert np.abs(fast[key] - left @ right).max() < 1e-3, key


@pytest.mark.parametrize(
    "native, tools, preset, seen",
    [
        ("1", [], None, "4"),
        ("0", [], None, None),
        ("1", ["cmake"], None, None),
        ("1", [], "20", "20"),
    ],
    ids=["native-on", "native-off", "cannot-build", "user-setting"],
)
def test_openblas_loads_with_a_short_thread_timeout_while_the_native_kernels_are_on(
    monkeypatch, native, tools, preset, seen
):
    """Spinning OpenBLAS workers would take the cores from the native kernels between matmuls."""
    from mlx_aim.cpu import blas

    monkeypatch.setenv("MLX_AIM_NATIVE", native)
    monkeypatch.setattr(blas, "missing_build_tools", lambda: tools)
    if preset is None:
        monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", preset)
    at_load = []

    def load(name, mode=0):
        at_load.append(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
        raise OSError("not a library")

    monkeypatch.setattr(blas.ctypes, "CDLL", load)
    assert blas._load("libopenblas.so.0", "system") is None
    assert at_load == [seen]
    assert os.environ.get("OPENBLAS_THREAD_TIMEOUT") == preset  # nothing left behind
