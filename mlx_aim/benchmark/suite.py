"""Side-by-side benchmark of mlx-aim, a plain-MLX baseline and PyTorch (``mlx-aim bench``).

One invocation measures every implementation on the same shapes, weights and inputs. Each
(implementation, task) runs in its own subprocess (``worker.py``) so that no BLAS loaded for
one library serves the other's matmuls; torch workers also get no ``LD_PRELOAD``.

Implementations: ``mlx-aim`` (the library's models, its compiled training step
``mlx_aim.train.step.make_train_step`` and a compiled forward), ``plain-mlx``
(``plain_mlx``: explicit softmax attention, ``nn.Conv2d`` patches, nothing compiled),
``torch-eager`` and ``torch-compile`` (``torch_reference``).
Tasks: ``train`` (forward, backward, gradient clipping to norm 1 and AdamW update of the
pre-training model and loss) and ``embed`` (trunk forward, no gradients). Every training column
uses the same paired prefix lengths (``objective.sample_paired_prefix_lengths``); mlx-aim and torch
run the pixel head only at the positions the loss reads (half of them), plain-MLX at every position
as a direct port would. FLOPs are counted analytically (matmuls only, 2 per multiply-add, full
N x N attention scores; training = 3 x the forward of the trunk and of the head where the loss
reads); MFU divides achieved FLOP/s by the best 2048 x 2048 fp32 GEMM rate measured in this run.

Memory: ``rss_peak_delta_bytes`` is the rise of the process's resident-set high-water mark during
warm-up and timed steps, measured alike for every implementation (Linux ``/proc``; tracemalloc
would miss the C allocations); MLX columns add MLX's allocator peak (``mx.get_peak_memory``) and
its part above the memory resident before the first step, per image.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .workload import (
    TASKS,
    flops_per_image,
    growth_cells,
    resolve_config,
    write_shared_state,
)

IMPLS = ("mlx-aim", "plain-mlx", "torch-eager", "torch-compile")
BLAS_MODES = ("auto", "bundled")
WORKER = "mlx_aim.benchmark.worker"
PACKAGE = Path(__file__).resolve().parents[1]  # mlx_aim/


@dataclass
class BenchOptions:
    """What ``run_benchmark`` measures; see ``mlx-aim bench --help``."""

    config: str
    batch_size: int | None = None
    tasks: tuple[str, ...] | None = None
    impls: tuple[str, ...] = IMPLS
    steps: int = 3
    warmup: int = 1
    rounds: int = 1
    grad_checkpoint: bool = False
    growth: bool = False
    growth_depth: int = 2
    growth_batch: int = 2
    loader: bool = False
    mlx_blas: tuple[str, ...] = ("auto",)
    threads: int | None = None
    seed: int = 0
    gemm_seconds: float = 1.0
    timeout: float = 1800.0
    command: str = ""
    verbose: bool = True
    errors: list[str] = field(default_factory=list)


# ---- workers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One measured column: an implementation, MLX's BLAS mode, activation checkpointing."""

    label: str
    impl: str
    blas: str | None = None
    grad_checkpoint: bool = False

    @property
    def backend(self) -> str:
        return "torch" if self.impl.startswith("torch") else "mlx"


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def columns(options: BenchOptions, tasks: tuple[str, ...]) -> list[Column]:
    out = []
    for i, blas in enumerate(options.mlx_blas):
        suffix = "" if i == 0 else f" [{blas} BLAS]"
        for impl in ("mlx-aim", "plain-mlx"):
            if impl in options.impls:
                out.append(Column(impl + suffix, impl, blas))
        if options.grad_checkpoint and "mlx-aim" in options.impls and "train" in tasks:
            out.append(Column("mlx-aim +ckpt" + suffix, "mlx-aim", blas, True))
    if torch_available():
        out += [Column(i, i) for i in ("torch-eager", "torch-compile") if i in options.impls]
    return out


THREAD_VARIABLES = (
    "MLX_AIM_CPU_STREAMS",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
)


def worker_env(column_backend: str, blas: str | None, threads: int | None) -> dict[str, str]:
    """The environment of a worker: this checkout first on the path, no preloaded or selected BLAS
    for torch and for MLX's bundled BLAS, and ``threads`` for every thread pool when given."""
    env = dict(os.environ)
    if threads:
        env.update({name: str(threads) for name in THREAD_VARIABLES})
    root = str(PACKAGE.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if column_backend == "torch" or blas == "bundled":
        env.pop("LD_PRELOAD", None)
        env["MLX_AIM_BLAS"] = "off"  # importing mlx_aim then loads no BLAS
    return env


def run_worker(spec: dict, backend: str, blas: str | None, options: BenchOptions, folder: Path):
    """Run one worker; its result dict, or ``{"error": ...}`` (also added to ``options.errors``)."""
    name = f"{spec['task']}-{spec['impl']}-{blas or 'torch'}-{len(options.errors)}-{os.urandom(3).hex()}"
    spec = {**spec, "out": str(folder / f"{name}.json")}
    spec_path = folder / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    label = f"{spec['impl']} {spec['task']}" + (f" ({blas} BLAS)" if blas else "")
    if options.verbose:
        print(f"[bench] {label} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", WORKER, str(spec_path)],
            env=worker_env(backend, blas, options.threads),
            capture_output=True,
            text=True,
            timeout=options.timeout,
        )
    except subprocess.TimeoutExpired:
        error = f"{label}: timed out after {options.timeout:.0f} s"
    else:
        if proc.returncode == 0:
            return json.loads(Path(spec["out"]).read_text())
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        error = f"{label}: {lines[-1] if lines else f'exit code {proc.returncode}'}"
    options.errors.append(error)
    if options.verbose:
        print(f"[bench] {error}", file=sys.stderr, flush=True)
    return {"error": error}


# ---- the benchmark -------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = pages * page
    except (ValueError, OSError, AttributeError):
        pass
    import mlx.core as mx

    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_bytes": memory,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
    }
    if torch_available():
        info["torch"] = _torch_version()
    return info


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "unknown"


def _metrics(raw: dict, batch: int, flops: float | None, peaks: dict) -> dict[str, Any]:
    if "error" in raw:
        return {"error": raw["error"]}
    times = raw["step_times_s"]
    step = statistics.median(times)
    ips = batch / step
    own_peak = peaks.get(raw["_peak_key"])
    achieved = flops * ips / 1e9 if flops else None
    machine_peak = max((v for v in peaks.values() if v), default=None)
    out = {
        "images_per_s": ips,
        "images_per_s_best": batch / min(times),
        "step_s": step,
        "step_s_min": min(times),
        "step_times_s": times,
        "first_step_s": raw.get("first_step_s"),
        "steps": len(times),
        "flops_per_image": flops,
        "achieved_gflops": achieved,
        "mfu": achieved / machine_peak if achieved and machine_peak else None,
        "mfu_own_backend": achieved / own_peak if achieved and own_peak else None,
        "rss_peak_delta_bytes": raw.get("rss_peak_delta_bytes"),
        "rss_bytes_per_image": (raw["rss_peak_delta_bytes"] / batch)
        if raw.get("rss_peak_delta_bytes") is not None
        else None,
        "blas": raw.get("blas"),
    }
    if "alloc_peak_bytes" in raw:
        over = raw["alloc_peak_bytes"] - raw["alloc_resident_bytes"]
        out.update(
            mlx_peak_bytes=raw["alloc_peak_bytes"],
            mlx_resident_bytes=raw["alloc_resident_bytes"],
            mlx_bytes_per_image=over / batch,
        )
    if "loss_at_init" in raw:
        out["loss_at_init"] = raw["loss_at_init"]
    if "cpu_streams" in raw:
        out["cpu_streams"] = raw["cpu_streams"]
    return out


def _add_ratios(per_impl: dict[str, dict]) -> None:
    for name, m in per_impl.items():
        if "images_per_s" not in m:
            continue
        m["ratios"] = {
            other: m["images_per_s"] / o["images_per_s"]
            for other, o in per_impl.items()
            if other != name and "images_per_s" in o
        }


def _embedding_agreement(dumps: dict[str, Path], reference: str) -> dict[str, float]:
    if reference not in dumps:
        return {}
    base = np.load(dumps[reference])
    scale = float(np.abs(base).max()) or 1.0
    return {
        label: float(np.abs(np.load(path) - base).max()) / scale
        for label, path in dumps.items()
        if label != reference
    }


def check_options(options: BenchOptions) -> None:
    """Raise ValueError (one line) for unknown names or out-of-range counts in ``options``."""
    bad = [i for i in options.impls if i not in IMPLS]
    if bad:
        raise ValueError(f"unknown implementation(s) {bad}; known: {', '.join(IMPLS)}")
    bad = [t for t in options.tasks or () if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; known: {', '.join(TASKS)}")
    bad = [b for b in options.mlx_blas if b not in BLAS_MODES]
    if bad or not options.mlx_blas:
        raise ValueError(f"--mlx-blas takes {' or '.join(BLAS_MODES)} (comma-separated), got {bad}")
    counts = (options.batch_size or 1, options.steps, options.warmup + 1, options.rounds)
    if min(counts) < 1:
        raise ValueError("need --batch-size >= 1, --steps >= 1, --rounds >= 1 and --warmup >= 0")
    if options.threads is not None and options.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {options.threads}")


def _result_header(options: BenchOptions, config: dict, tasks: tuple[str, ...], batch: int):
    """The settings, machine and code a result describes, before anything is measured."""
    result: dict[str, Any] = {
        "config": options.config,
        "model_config": config,
        "batch_size": batch,
        "tasks": list(tasks),
        "warmup": options.warmup,
        "steps": options.steps,
        "rounds": options.rounds,
        "threads": options.threads,
        "command": options.command,
        "machine": machine_info(),
        "load_average": {"start": _load_average()},
        "source": {"start": source_fingerprint()},
        "flops_per_image": flops_per_image(config, batch),
        "notes": [],
    }
    if not torch_available() and any(i.startswith("torch") for i in options.impls):
        result["notes"].append("torch is not installed: PyTorch columns skipped")
    return result


def measure_peaks(chosen: list[Column], base: dict, options: BenchOptions, folder: Path):
    """(GEMM GFLOP/s, BLAS name) of each backend and BLAS mode, each measured in its own process."""
    peaks, blas_names = {}, {}
    for key, impl, blas in _peak_jobs(chosen):
        spec = {**base, "impl": impl, "task": "peak", "blas": blas}
        raw = run_worker(spec, _backend(impl), blas, options, folder)
        peaks[key] = raw.get("gemm_gflops")
        blas_names[key] = raw.get("blas")
    return peaks, blas_names


def measure_task(
    task: str, chosen: list[Column], base: dict, peaks: dict, options: BenchOptions, folder: Path
) -> tuple[dict[str, dict], dict[str, float]]:
    """(metrics per column, agreement with mlx-aim) of one task; rounds are interleaved and each
    column keeps its best round."""
    per_impl, dumps = {}, {}
    flops = flops_per_image(base["config"], base["batch"])[task]
    for _ in range(options.rounds):
        for i, v in enumerate(chosen):
            if v.grad_checkpoint and task != "train":
                continue
            dump = folder / f"{task}-{i}.npy"
            spec = {
                **base,
                "impl": v.impl,
                "task": task,
                "blas": v.blas,
                "grad_checkpoint": v.grad_checkpoint,
                "dump": str(dump),
            }
            raw = run_worker(spec, v.backend, v.blas, options, folder)
            raw["_peak_key"] = _peak_key(v.impl, v.blas)
            metrics = _metrics(raw, base["batch"], flops, peaks)
            if metrics.get("images_per_s", 0) >= per_impl.get(v.label, {}).get("images_per_s", 0):
                per_impl[v.label] = metrics
            if task == "embed" and dump.exists():
                dumps[v.label] = dump
    _add_ratios(per_impl)
    return per_impl, _agreement(task, per_impl, dumps)


def run_benchmark(options: BenchOptions) -> dict[str, Any]:
    """Measure everything ``options`` asks for; returns the JSON-able result."""
    check_options(options)
    config, tasks, default_batch = resolve_config(options.config, options.tasks)
    batch = options.batch_size or default_batch
    chosen = columns(options, tasks)
    result = _result_header(options, config, tasks, batch)
    with tempfile.TemporaryDirectory(prefix="mlx-aim-bench-") as tmp:
        folder = Path(tmp)
        weights, inputs = write_shared_state(config, batch, options.seed, folder)
        base = {
            "config": config,
            "weights": str(weights),
            "inputs": str(inputs),
            "batch": batch,
            "warmup": options.warmup,
            "steps": options.steps,
            "seed": options.seed,
            "gemm_seconds": options.gemm_seconds,
        }
        peaks, result["blas"] = measure_peaks(chosen, base, options, folder)
        result["gemm_peak_gflops"] = peaks
        result["machine_peak_gflops"] = max((v for v in peaks.values() if v), default=None)
        result["results"], result["agreement"] = {}, {}
        for task in tasks:
            result["results"][task], result["agreement"][task] = measure_task(
                task, chosen, base, peaks, options, folder
            )
        if options.grad_checkpoint:
            result["grad_checkpoint"] = _checkpoint_summary(result["results"].get("train", {}))
        if options.growth:
            result["growth"] = _run_growth(options, chosen, folder, peaks)
        if options.loader:
            result["loader"] = _run_loader(options, config, batch, folder)
    result["load_average"]["end"] = _load_average()
    result["source"]["end"] = source_fingerprint()
    result["errors"] = list(options.errors)
    return result


def source_fingerprint() -> str:
    """Short hash of the package's Python sources: which code a result measured."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _backend(impl: str) -> str:
    return "torch" if impl.startswith("torch") else "mlx"


def _peak_key(impl: str, blas: str | None) -> str:
    return "torch" if impl.startswith("torch") else f"mlx ({blas} BLAS)"


def _peak_jobs(chosen: list[Column]) -> list[tuple[str, str, str | None]]:
    jobs = {}
    for v in chosen:
        jobs.setdefault(_peak_key(v.impl, v.blas), (v.impl, v.blas))
    return [(key, impl, blas) for key, (impl, blas) in jobs.items()]


def _agreement(task: str, per_impl: dict, dumps: dict) -> dict[str, float]:
    """How far each implementation is from mlx-aim on the same weights and inputs."""
    if task == "embed":
        return _embedding_agreement(dumps, "mlx-aim")
    ref = per_impl.get("mlx-aim", {}).get("loss_at_init")
    if ref is None:
        return {}
    return {
        label: abs(m["loss_at_init"] - ref)
        for label, m in per_impl.items()
        if label != "mlx-aim" and "loss_at_init" in m
    }


def _checkpoint_summary(train: dict) -> dict[str, Any]:
    plain, ckpt = train.get("mlx-aim", {}), train.get("mlx-aim +ckpt", {})
    if "mlx_peak_bytes" not in plain or "mlx_peak_bytes" not in ckpt:
        return {}
    over = [m["mlx_peak_bytes"] - m["mlx_resident_bytes"] for m in (plain, ckpt)]
    return {
        "peak_bytes": plain["mlx_peak_bytes"],
        "peak_bytes_checkpointed": ckpt["mlx_peak_bytes"],
        "peak_reduction": 1 - ckpt["mlx_peak_bytes"] / plain["mlx_peak_bytes"],
        "step_peak_over_weights_reduction": 1 - over[1] / over[0],
        "slowdown": plain["images_per_s"] / ckpt["images_per_s"],
    }


def _run_growth(options: BenchOptions, chosen: list[Column], folder: Path, peaks: dict) -> dict:
    cells = growth_cells(options.growth_depth, options.growth_batch)
    out: dict[str, Any] = {
        "depth": options.growth_depth,
        "head_blocks": 1,
        "batch": options.growth_batch,
        "cells": {},
    }
    for v in chosen:
        if v.impl not in ("mlx-aim", "torch-eager") or v.grad_checkpoint or v.label != v.impl:
            continue
        spec = {
            "impl": v.impl,
            "task": "growth",
            "blas": v.blas,
            "cells": cells,
            "batch": options.growth_batch,
            "warmup": 1,
            "steps": options.steps,
            "seed": options.seed,
        }
        raw = run_worker(spec, v.backend, v.blas, options, folder)
        if "error" in raw:
            continue
        rows = []
        for cell in raw["cells"]:
            step = statistics.median(cell["step_times_s"])
            rows.append(
                {
                    "arch": cell["arch"],
                    "width": cell["width"],
                    "patches": cell["patches"],
                    "step_s": step,
                    "ms_per_image": 1000 * step / cell["batch"],
                    "gflop_per_image": cell["flops_per_image"] / 1e9,
                    "achieved_gflops": cell["flops_per_image"] * cell["batch"] / step / 1e9,
                }
            )
        out["cells"][v.label] = rows
    return out


def _run_loader(options: BenchOptions, config: dict, batch: int, folder: Path) -> dict:
    if config["model_type"] != "aim_pretrain":
        return {"error": "--loader needs a config with a training step"}
    images = folder / "loader-images"
    images.mkdir()
    spec = {
        "impl": "mlx-aim",
        "task": "loader",
        "blas": options.mlx_blas[0],
        "config": config,
        "batch": batch,
        "warmup": options.warmup,
        "steps": max(options.steps, 5),
        "image_dir": str(images),
        "num_images": max(64, 8 * batch),
        "workers": 2,
        "loader_batches": 10,
        "seed": options.seed,
    }
    raw = run_worker(spec, "mlx", options.mlx_blas[0], options, folder)
    if "error" in raw:
        return raw
    wait, step = sum(raw["fed_wait_s"]), sum(raw["fed_step_s"])
    steps_ips = batch * len(raw["fed_step_s"]) / step
    return {
        "loader_images_per_s": raw["loader_images_per_s"],
        "step_images_per_s": steps_ips,
        "loader_to_step_ratio": raw["loader_images_per_s"] / steps_ips,
        "fed_wait_fraction": wait / (wait + step),
        "workers": spec["workers"],
    }
