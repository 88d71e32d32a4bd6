"""Give MLX's Linux CPU backend an optimized BLAS instead of the reference BLAS its wheel bundles.

The ``mlx[cpu]`` wheel links ``libmlx.so`` against netlib's reference BLAS (about 5 GFLOP/s for an
fp32 matmul). Python loads ``mlx.core`` with ``RTLD_NOW``, and a library loaded ``RTLD_GLOBAL``
before that import comes first in the symbol lookup, so MLX's ``cblas_sgemm``/``sgemm_`` calls
bind to it (OpenBLAS: about 35x faster here). Loading it after ``import mlx.core`` has no effect.
A different BLAS sums in a different order: results agree to fp32 rounding, not bit for bit.

OpenBLAS's worker threads spin for about 2^28 cycles (a tenth of a second) after each matmul
before they sleep; on a machine with few cores that spinning takes the cores from the native
kernels of ``mlx_aim.cpu.native``, which run between the matmuls. While the native kernels are on
(``MLX_AIM_NATIVE`` not 0, and the tools to build them present), OpenBLAS is loaded with
``OPENBLAS_THREAD_TIMEOUT=4`` (its workers sleep at once; waking them costs microseconds per
matmul), unless that variable is set.

Search order: ``MLX_AIM_BLAS`` (a library path, or ``off``); a BLAS already in the global scope
(``LD_PRELOAD``); OpenBLAS (the ``ngsolve-openblas`` wheel, then the system's); MKL (the ``mkl``
wheel of the ``fast-cpu`` extra, then the system's); BLIS. OpenBLAS comes before MKL because it
was the faster of the two on the AMD CPUs measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import logging
import os
import re
import site
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from ..env import env_flag
from .toolchain import missing_build_tools, switched_off

ENV_VAR = "MLX_AIM_BLAS"
THREAD_TIMEOUT_VAR = "OPENBLAS_THREAD_TIMEOUT"
_SYSTEM_OPENBLAS = ("libopenblasp.so.0", "libopenblas.so.0")  # Fedora's pthread build, then any
_SYSTEM_OTHERS = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libblis.so.4", "libblis.so.3")
_HINT = "apt-get install libopenblas0-pthread, or pip install 'mlx-aim[fast-cpu]'"

logger = logging.getLogger("mlx_aim")


@dataclass(frozen=True)
class BlasInfo:
    """The BLAS that serves MLX's CPU matmuls.

    Attributes:
        name: ``"OpenBLAS"``, ``"MKL"``, ``"BLIS"`` or ``"unknown"``.
        version: the library's own version or build string ("" when it has none).
        path: the library file that provides ``cblas_sgemm``/``sgemm_``.
        source: ``"MLX_AIM_BLAS"``, ``"preloaded"``, ``"pip"`` or ``"system"``.
    """

    name: str
    version: str
    path: str
    source: str

    def __str__(self) -> str:
        label = " ".join(part for part in (self.name, self.version) if part)
        return f"{label} ({self.source}: {self.path})"


_state: dict[str, BlasInfo | None] = {}


def blas_info() -> BlasInfo | None:
    """The BLAS chosen by :func:`enable_fast_blas`; ``None`` means MLX's own (bundled) BLAS."""
    return _state.get("info")


def enable_fast_blas() -> BlasInfo | None:
    """Load the best optimized BLAS found, once per process, before ``mlx.core`` is imported.

    A no-op returning ``None`` on macOS (MLX uses Accelerate), with a CUDA build of MLX, with
    ``MLX_AIM_BLAS=off``, or when nothing is found. Never raises.
    """
    if "info" not in _state:
        try:
            _state["info"] = _choose()
        except (OSError, AttributeError, IndexError, ValueError) as error:  # odd library builds
            logger.warning("could not set up an optimized BLAS (%s); MLX keeps its own", error)
            _state["info"] = None
        if _state["info"] is not None:
            logger.info("MLX CPU BLAS: %s", _state["info"])
    return _state["info"]


# (get, set) thread-count entry points of each library, looked up in the whole process
_THREAD_CONTROLS = (
    ("openblas_get_num_threads", "openblas_set_num_threads"),
    ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
    ("bli_thread_get_num_threads", "bli_thread_set_num_threads"),
)


@contextlib.contextmanager
def blas_threads(count: int) -> Iterator[None]:
    """Run the block with the loaded BLAS limited to ``count`` threads (a no-op when the BLAS has
    no thread control)."""
    process = ctypes.CDLL(None)
    for get_name, set_name in _THREAD_CONTROLS:
        if hasattr(process, get_name) and hasattr(process, set_name):
            get, set_ = getattr(process, get_name), getattr(process, set_name)
            previous = get()
            set_(ctypes.c_int(max(1, count)))
            try:
                yield
            finally:
                set_(ctypes.c_int(previous))
            return
    yield


def _choose() -> BlasInfo | None:
    if not sys.platform.startswith("linux") or _mlx_uses_cuda():
        return None
    setting = os.environ.get(ENV_VAR, "").strip()
    if not env_flag(ENV_VAR):
        logger.info("%s=%s: MLX keeps its bundled BLAS", ENV_VAR, setting)
        return None
    preloaded = _describe(ctypes.CDLL(None), "preloaded")
    if preloaded is not None:
        return preloaded
    if "mlx.core" in sys.modules:
        logger.warning(
            "mlx.core was imported before mlx_aim, so MLX keeps its slow bundled BLAS: import "
            "mlx_aim first, or start Python with LD_PRELOAD=<path of an optimized BLAS>"
        )
        return None
    if setting:
        info = _load(setting, "MLX_AIM_BLAS")
        if info is None:
            logger.warning(
                "%s=%s is not a loadable BLAS library; MLX keeps its bundled BLAS", ENV_VAR, setting
            )
        return info
    for name_or_path, source in _candidates():
        info = _load(name_or_path, source)
        if info is not None:
            return info
    logger.info("no optimized BLAS found, MLX's CPU matmuls stay slow: %s", _HINT)
    return None


def _mlx_uses_cuda() -> bool:
    """True when a CUDA build of MLX (``mlx-cuda-12``, ``mlx-cuda-13``...) is installed."""
    return any(glob.glob(os.path.join(entry, "mlx_cuda*.dist-info")) for entry in sys.path)


def _candidates() -> list[tuple[str, str]]:
    """(library path or soname, source), best first."""
    found: list[tuple[str, str]] = []
    spec = importlib.util.find_spec("ngsolve_openblas")  # needs the system's libgfortran.so.5
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found += [(p, "pip") for p in sorted(glob.glob(os.path.join(folder, "libopenblas*.so*")))]
    found += [(soname, "system") for soname in _SYSTEM_OPENBLAS]
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, site.getuserbase())):
        mkl = glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so.*"))  # the `mkl` wheel
        found += [(p, "pip") for p in sorted(mkl, reverse=True)]
    return found + [(soname, "system") for soname in _SYSTEM_OTHERS]


@contextlib.contextmanager
def _openblas_settings() -> Iterator[None]:
    """OpenBLAS reads its settings from the environment when it loads: a short thread timeout
    when the native kernels will run (on, and buildable here; see the module docstring), put back
    afterwards."""
    if switched_off() or THREAD_TIMEOUT_VAR in os.environ or missing_build_tools():
        yield
        return
    os.environ[THREAD_TIMEOUT_VAR] = "4"
    try:
        yield
    finally:
        del os.environ[THREAD_TIMEOUT_VAR]


def _load(name_or_path: str, source: str) -> BlasInfo | None:
    try:
        with _openblas_settings():
            lib = ctypes.CDLL(name_or_path, mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        logger.debug("cannot load %s: %s", name_or_path, error)
        return None
    info = _describe(lib, source)
    if info is not None and info.name == "BLIS":
        _use_all_cores_for_blis(lib)
    return info


def _describe(lib: ctypes.CDLL, source: str) -> BlasInfo | None:
    """Identify the library serving ``cblas_sgemm``/``sgemm_`` as seen from ``lib``."""
    path = _provider_path(lib)
    if path is None:
        return None
    if hasattr(lib, "openblas_get_config"):
        lib.openblas_get_config.restype = ctypes.c_char_p
        lib.openblas_get_corename.restype = ctypes.c_char_p
        release = lib.openblas_get_config().decode().split()[1]  # "OpenBLAS 0.3.21 <options>"
        name, version = "OpenBLAS", f"{release} ({lib.openblas_get_corename().decode()})"
    elif hasattr(lib, "MKL_Get_Version_String"):
        buffer = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(buffer, len(buffer))
        match = re.search(r"Version ([\d.]+)", buffer.value.decode(errors="replace"))
        name, version = "MKL", match.group(1) if match else ""
    elif hasattr(lib, "bli_info_get_version_str"):
        lib.bli_info_get_version_str.restype = ctypes.c_char_p
        name, version = "BLIS", lib.bli_info_get_version_str().decode()
    else:
        name, version = "unknown", ""
    return BlasInfo(name, version.strip(), path, source)


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _provider_path(lib: ctypes.CDLL) -> str | None:
    """The file defining the sgemm entry point that ``lib``'s lookup scope resolves to."""
    for symbol in ("cblas_sgemm", "sgemm_"):
        try:
            address = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p)
        except AttributeError:
            continue
        found = _DlInfo()
        if _dladdr()(address, ctypes.byref(found)) and found.dli_fname:
            return os.path.realpath(found.dli_fname.decode())
    return None


def _dladdr():
    process = ctypes.CDLL(None)
    return process.dladdr if hasattr(process, "dladdr") else ctypes.CDLL("libdl.so.2").dladdr


def _use_all_cores_for_blis(lib: ctypes.CDLL) -> None:
    """Debian's BLIS runs single-threaded unless told otherwise; BLIS never splits the k loop of
    a matmul, so the thread count does not change results."""
    configured = any(v in os.environ for v in ("BLIS_NUM_THREADS", "OMP_NUM_THREADS"))
    if not configured and hasattr(lib, "bli_thread_set_num_threads"):
        lib.bli_thread_set_num_threads(ctypes.c_long(len(os.sched_getaffinity(0))))
