"""The benchmark result (``suite.run_benchmark``) as the markdown section docs/performance.md shows."""

from __future__ import annotations

from typing import Any

MIB = 2**20


def _fmt(value: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value / scale, spec)


def to_markdown(result: dict[str, Any]) -> str:
    """The result as the markdown section docs/performance.md shows."""
    lines = [
        f"### {result['config']}, batch {result['batch_size']}",
        "",
        *_setup_lines(result),
        "",
        *_table_lines(result),
        "",
        *_note_lines(result),
    ]
    return "\n".join(lines) + "\n"


def _setup_lines(result: dict[str, Any]) -> list[str]:
    """Machine, command, matmul peaks and FLOP counts: what the table's numbers mean."""
    m = result["machine"]
    memory = f", {m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else ""
    return [
        f"Machine: {m['cpu']}, {m['cores']} cores{memory}, {m['os']}; Python {m['python']}, "
        f"MLX {m['mlx']} ({m['mlx_device']})"
        + (f", torch {m['torch']}" if m.get("torch") else "")
        + ".",
        "",
        f"Command: `{result['command']}` ({result['warmup']} warm-up + {result['steps']} timed "
        f"steps per column, each column in its own process, best of {result['rounds']} "
        "interleaved round(s); step time = median of the timed steps, 'best' = fastest step; "
        f"threads: {result['threads'] or 'library defaults'}). "
        f"Load average at start / end: {result['load_average']['start']} / "
        f"{result['load_average']['end']}. mlx_aim sources: {result['source']['start']}.",
        "",
        "Matmul peak (2048x2048 fp32 GEMM, this run): "
        + ", ".join(
            f"{key} {_fmt(v)} GFLOP/s [{result['blas'].get(key) or '?'}]"
            for key, v in result["gemm_peak_gflops"].items()
        )
        + f". MFU uses the best of these ({_fmt(result['machine_peak_gflops'])} GFLOP/s); "
        "'MFU own' uses the column's own backend.",
        "",
        "Model FLOPs per image (matmuls, 2 per multiply-add; train = 3 x forward of the trunk and "
        "of the pixel head at the positions the loss reads, which mlx-aim and torch compute; "
        "plain-mlx runs the head at every position): "
        + ", ".join(
            f"{task} {_fmt(f, '.2f', 1e9)} GFLOP"
            for task, f in result["flops_per_image"].items()
            if f is not None and task in result["tasks"]
        )
        + ".",
    ]


def _table_lines(result: dict[str, Any]) -> list[str]:
    """One row per task and implementation."""
    lines = [
        "| task | implementation | images/s | best | step ms | GFLOP/s | MFU | MFU own "
        "| RSS rise MiB | MLX peak MiB | MLX B/image | mlx-aim is |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, per_impl in result["results"].items():
        for label, r in per_impl.items():
            if "error" in r:
                lines.append(f"| {task} | {label} | failed: {r['error']} |" + " |" * 10)
                continue
            ratio = r["ratios"].get("mlx-aim")
            versus = "–" if label == "mlx-aim" else _fmt(1 / ratio if ratio else None, ".2f") + "x"
            lines.append(
                f"| {task} | {label} | {_fmt(r['images_per_s'], '.2f')} "
                f"| {_fmt(r['images_per_s_best'], '.2f')} "
                f"| {_fmt(r['step_s'] * 1000, '.0f')} | {_fmt(r['achieved_gflops'])} "
                f"| {_fmt(r['mfu'] and 100 * r['mfu'])}% "
                f"| {_fmt(r['mfu_own_backend'] and 100 * r['mfu_own_backend'])}% "
                f"| {_fmt(r['rss_peak_delta_bytes'], '.0f', MIB)} "
                f"| {_fmt(r.get('mlx_peak_bytes'), '.0f', MIB)} "
                f"| {_fmt(r.get('mlx_bytes_per_image'), '.2e')} | {versus} |"
            )
    return lines


def _note_lines(result: dict[str, Any]) -> list[str]:
    """Agreement, warnings, and the optional checkpointing, growth and loader results."""
    lines = [_agreement_line(result)]
    split = [
        f"{task} {label}: {r['cpu_streams']}"
        for task, per_impl in result["results"].items()
        for label, r in per_impl.items()
        if r.get("cpu_streams", 1) > 1
    ]
    if split:
        lines += [
            "",
            f"Batches split over CPU streams ({', '.join(split)}); see mlx_aim/cpu/streams.py.",
        ]
    source = result.get("source", {})
    if source.get("start") != source.get("end"):
        lines += ["", f"Warning: mlx_aim's sources changed during this run ({source})."]
    ckpt = result.get("grad_checkpoint")
    if ckpt:
        lines += [
            "",
            f"Activation checkpointing (mlx-aim train): MLX peak {_fmt(ckpt['peak_bytes'], '.0f', MIB)}"
            f" -> {_fmt(ckpt['peak_bytes_checkpointed'], '.0f', MIB)} MiB "
            f"({100 * ckpt['peak_reduction']:.0f}% less; step memory above the weights "
            f"{100 * ckpt['step_peak_over_weights_reduction']:.0f}% less), "
            f"{ckpt['slowdown']:.2f}x the step time.",
        ]
    if result.get("growth"):
        lines += ["", *_growth_lines(result["growth"])]
    loader = result.get("loader")
    if loader:
        if "error" in loader:
            lines += ["", f"Loader: failed: {loader['error']}"]
        else:
            lines += [
                "",
                f"Data loading ({loader['workers']} decode threads, TrainTransform, JPEG files): "
                f"{loader['loader_images_per_s']:.1f} images/s alone; the mlx-aim step fed by it "
                f"consumes {loader['step_images_per_s']:.1f} images/s "
                f"(loader/step {loader['loader_to_step_ratio']:.1f}x; the step waited for data "
                f"{100 * loader['fed_wait_fraction']:.1f}% of the time).",
            ]
    if result.get("notes") or result.get("errors"):
        lines += ["", *(f"- {n}" for n in result["notes"] + result["errors"])]
    return lines


def _agreement_line(result: dict) -> str:
    parts = []
    for task, diffs in result.get("agreement", {}).items():
        what = (
            "|loss - mlx-aim loss| at the initial weights"
            if task == "train"
            else "max |out - mlx-aim| / max |mlx-aim|"
        )
        if diffs:
            parts.append(f"{task} {what}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return "Same model check (shared weights and inputs): " + ("; ".join(parts) or "–") + "."


def _growth_lines(growth: dict) -> list[str]:
    lines = [
        f"Growth: training step ms per image ({growth['depth']} trunk blocks, 1 head block, "
        f"batch {growth['batch']}), by width and patches per image; in brackets the achieved "
        "GFLOP/s.",
        "",
    ]
    for label, rows in growth["cells"].items():
        patches = sorted({r["patches"] for r in rows})
        lines += [
            f"| {label} | " + " | ".join(f"{p} patches" for p in patches) + " |",
            "|---|" + "---:|" * len(patches),
        ]
        for arch in dict.fromkeys(r["arch"] for r in rows):
            cells = {r["patches"]: r for r in rows if r["arch"] == arch}
            width = next(iter(cells.values()))["width"]
            lines.append(
                f"| {arch} (width {width}) | "
                + " | ".join(
                    f"{cells[p]['ms_per_image']:.0f} ({cells[p]['achieved_gflops']:.0f})"
                    for p in patches
                )
                + " |"
            )
        lines.append("")
    return lines
