"""Native CPU kernels: mlx-aim's C++ primitives for MLX's Linux CPU backend.

MLX's x86 CPU backend runs elementwise ops and softmax single-threaded and unvectorized, and
attention as one small BLAS call per head. The C++ primitives in ``csrc/`` (MLX's extension
mechanism: a ``Primitive`` with ``eval_cpu`` and ``vjp``, nanobind bindings) compute fused
attention, exact GELU, SwiGLU's gate, masked softmax, LayerNorm and RMSNorm, forward and backward,
and the AdamW update and sum of squares of the optimizer, vectorized for this CPU and split over
its cores, in float32. They work inside ``mx.compile``.

They are compiled on the user's machine, once, into ``$MLX_AIM_CACHE/native`` (else
``~/.cache/mlx-aim/native``), keyed by the MLX, nanobind and Python versions, the CPU's flags and
the sources: on first use, or by ``mlx-aim build-kernels``. That needs cmake, nanobind and a C++
compiler (``pip install 'mlx-aim[native]'`` and e.g. ``apt-get install g++``); nanobind must be
the version MLX was built with, which the build checks. Without them one warning says so and the
portable kernels of ``mlx_aim.models.ops`` run; ``MLX_AIM_NATIVE=0`` turns the kernels off. Never
built or used with MLX's Metal or CUDA backends, nor outside Linux.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import mlx.core as mx

from ..env import cache_root
from .toolchain import ENV_VAR, cmake_path, missing_build_tools, switched_off

MODULE_NAME = "mlx_aim_kernels"
SOURCE_DIR = Path(__file__).parent / "csrc"
BUILD_TIMEOUT_S = 300
HINT = (
    "install them (pip install 'mlx-aim[native]'; a C++ compiler such as g++), "
    "then run `mlx-aim build-kernels`"
)
# nanobind's internals key (platform ABI and internals version): an extension shares MLX's types
# only when the nanobind it was built with writes the same key as MLX's.
_NANOBIND_KEY = re.compile(rb"nanobind[A-Za-z0-9_]*?_a\d+_v\d+(?:_stable)?")

logger = logging.getLogger("mlx_aim")
_lock = threading.Lock()
_state: dict = {}  # "module": the loaded kernels or None, once tried in this process


class NativeBuildError(RuntimeError):
    """The kernels could not be built or loaded: a one-line message, and the build's output."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def native_kernels() -> ModuleType | None:
    """The compiled kernels (``attention``, ``gelu``, ``silu_gate``, ``softmax``, ``layer_norm``,
    ``rms_norm``, ``adamw_update``, ``sum_of_squares``), built into the cache on first use, or
    None where they do not apply or cannot be had: then one warning says why and how to enable
    them."""
    if unavailable_reason() is not None:
        return None
    with _lock:
        if "module" not in _state:
            _state["module"] = _load_or_build()
    return _state["module"]


def native_status() -> str:
    """One line on the kernels, for ``mlx-aim --version``; builds nothing."""
    reason = unavailable_reason()
    if reason is not None:
        return f"off ({reason})"
    if module_path().exists():
        return f"on ({module_path()})"
    if _failure_log().exists():
        return f"off (the build failed, see {_failure_log()})"
    missing = missing_build_tools()
    if missing:
        return f"off (they need {', '.join(missing)}: {HINT})"
    return "not built yet (builds on first use, or run `mlx-aim build-kernels`)"


def build_kernels(force: bool = False) -> Path:
    """Compile the kernels into the cache (again with ``force``) and return the module's path.

    Raises NativeBuildError (one line) when the tools are missing or the build fails; the full
    log of a failed build is kept next to where the module would be.
    """
    target = module_path()
    if target.exists() and not force:
        return target
    missing = missing_build_tools()
    if missing:
        raise NativeBuildError(f"they need {', '.join(missing)}: {HINT}")
    logger.info("building mlx-aim's native CPU kernels (once) into %s", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _failure_log().unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as build_dir:
        try:
            built = _compile(Path(build_dir))
            _check_nanobind_abi(built)
        except NativeBuildError as error:
            _failure_log().write_text(f"{error}\n\n{error.log}")
            raise
        os.replace(built, target)  # atomic: concurrent builds each put a whole module in place
    return target


def module_path() -> Path:
    """Where the compiled module for this machine and these versions lives (or will)."""
    return cache_root() / "native" / f"{MODULE_NAME}-{_build_key()}.so"


def unavailable_reason() -> str | None:
    """Why the kernels are not for this process (``MLX_AIM_NATIVE=0``, not Linux, a GPU
    backend), or None where they are."""
    if switched_off():
        return f"{ENV_VAR}=0"
    if platform.system() != "Linux":
        return "Linux only"
    if mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()):
        return "MLX has a GPU backend"
    return None


def _load_or_build() -> ModuleType | None:
    if not module_path().exists() and _failure_log().exists():
        logger.warning(
            "native CPU kernels off: their build failed (see %s); `mlx-aim build-kernels` retries",
            _failure_log(),
        )
        return None
    try:
        return _load(build_kernels())
    except (NativeBuildError, OSError) as error:
        logger.warning("native CPU kernels off: %s; the portable kernels run", error)
        return None


def _load(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    try:
        loader.exec_module(module)
        module.gelu(mx.zeros((1,)))  # builds a graph node: fails when MLX's types do not convert
    except (ImportError, TypeError) as error:
        raise NativeBuildError(f"{path} does not load: {error}") from None
    return module


def _compile(build_dir: Path) -> Path:
    import nanobind

    mlx_cmake = _run([sys.executable, "-m", "mlx", "--cmake-dir"], build_dir).strip()
    configure = [
        cmake_path(),
        "-S",
        str(SOURCE_DIR),
        "-B",
        str(build_dir),
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DMLX_ROOT={mlx_cmake}",
        f"-Dnanobind_ROOT={nanobind.cmake_dir()}",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    _run(configure, build_dir)
    _run([cmake_path(), "--build", str(build_dir), "--parallel"], build_dir)
    built = sorted(build_dir.glob(f"{MODULE_NAME}*.so"))
    if not built:
        raise NativeBuildError(f"their build wrote no module in {build_dir}")
    return built[0]


def _run(command: list[str], cwd: Path) -> str:
    """stdout of ``command``; NativeBuildError (its output attached as ``log``) if it fails."""
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"`{Path(command[0]).name}` ran over {BUILD_TIMEOUT_S} s") from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        last = output.splitlines()[-1] if output else f"exit status {done.returncode}"
        raise NativeBuildError(
            f"their build failed: {last.strip()}",
            log=f"$ {' '.join(command)}\n{output}",
        )
    return done.stdout


def _check_nanobind_abi(built: Path) -> None:
    """Fail unless the module uses the nanobind ABI MLX's Python bindings were built with."""
    ours, mlx_key = (_nanobind_key(Path(path)) for path in (built, mx.__file__))
    if mlx_key is not None and ours != mlx_key:
        raise NativeBuildError(
            f"nanobind {_version('nanobind')} builds for ABI {ours}, but mlx {mx.__version__} "
            f"uses {mlx_key}: install the nanobind version mlx was built with"
        )


def _nanobind_key(binary: Path) -> str | None:
    found = _NANOBIND_KEY.search(binary.read_bytes())
    return found.group().decode() if found else None


def _failure_log() -> Path:
    return module_path().with_suffix(".failed.log")


def _build_key() -> str:
    """Digest of what the compiled module depends on: versions, CPU flags, the sources."""
    parts = [
        mx.__version__,
        _version("nanobind"),
        sysconfig.get_config_var("EXT_SUFFIX") or "",
        platform.machine(),
        _cpu_flags(),
    ]
    digest = hashlib.sha256("\n".join(parts).encode())
    for source in sorted(SOURCE_DIR.iterdir()):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    """The first CPU's feature flags (what ``-march=native`` compiles for)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    found = re.search(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.MULTILINE)
    return found.group(1).strip() if found else ""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"
