"""``mlx-aim bench``: mlx-aim against a plain-MLX baseline and PyTorch, side by side."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer

from mlx_aim.errors import ExitCode, InputError, exit_codes_help
from mlx_aim.io import check_destination, write_text

from .errors import prepare_cpu_backend, reported_errors


def register(app: typer.Typer) -> None:
    """Add ``mlx-aim bench`` to ``app``."""
    app.command(
        "bench",
        epilog=exit_codes_help(
            ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.USAGE, ExitCode.OUTPUT, ExitCode.INTERRUPTED
        ),
    )(bench_command)


def _names(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def bench_command(
    config: str = typer.Option(
        ..., "--config", help="Registry name (mlx-aim models) or 'vit-s' (= aim-small's shape)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Images per step (default 8; 1 for released models)."
    ),
    tasks: str | None = typer.Option(
        None, "--tasks", help="train,embed (default both; embed only for released models)."
    ),
    impls: str = typer.Option(
        "mlx-aim,plain-mlx,torch-eager,torch-compile", "--impls", help="Columns to measure."
    ),
    steps: int = typer.Option(3, "--steps", help="Timed steps per column."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed steps first (compilation included)."),
    rounds: int = typer.Option(
        1, "--rounds", help="Repeat every column, interleaved; keep each one's best round."
    ),
    grad_checkpoint: bool = typer.Option(
        False, "--grad-checkpoint", help="Also train mlx-aim with activation checkpointing."
    ),
    growth: bool = typer.Option(
        False, "--growth", help="Also time the step over widths x patches per image."
    ),
    growth_depth: int = typer.Option(2, "--growth-depth", help="Trunk blocks in --growth models."),
    loader: bool = typer.Option(
        False, "--loader", help="Also measure ImageLoader throughput against the step's."
    ),
    mlx_blas: str = typer.Option(
        "auto",
        "--mlx-blas",
        help="MLX's BLAS: auto (mlx_aim.cpu.blas picks an optimized one), bundled (the wheel's), or "
        "both as 'auto,bundled' (first is the main column set).",
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="Threads for every backend (OMP/OpenBLAS/MKL/BLIS variables and MLX_AIM_CPU_STREAMS); default: libraries' own.",
    ),
    timeout: float = typer.Option(1800, "--timeout", help="Seconds allowed per worker process."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full result as JSON."),
    markdown_out: Path | None = typer.Option(None, "--markdown", help="Write the markdown table."),
    force: bool = typer.Option(
        False, "--force", help="Replace existing --json / --markdown files."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
) -> None:
    """Benchmark the pre-training step and embedding throughput, side by side.

    Each implementation runs in its own process on the same weights and inputs; the markdown
    table goes to stdout (and --markdown), everything to --json.

    Example: [bold]mlx-aim bench --config aim-tiny --batch-size 8 --json bench.json[/bold]
    """
    from mlx_aim.benchmark.report import to_markdown
    from mlx_aim.benchmark.suite import BenchOptions, run_benchmark

    options = BenchOptions(
        config=config,
        batch_size=batch_size,
        tasks=_names(tasks),
        impls=_names(impls) or (),
        steps=steps,
        warmup=warmup,
        rounds=rounds,
        grad_checkpoint=grad_checkpoint,
        growth=growth,
        growth_depth=growth_depth,
        loader=loader,
        mlx_blas=_names(mlx_blas) or (),
        threads=threads,
        timeout=timeout,
        command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        verbose=not quiet,
    )
    with reported_errors():
        if timeout <= 0:
            raise InputError(f"--timeout must be > 0 seconds, not {timeout}")
        if growth_depth < 1:
            raise InputError(f"--growth-depth must be >= 1, not {growth_depth}")
        for out in (json_out, markdown_out):
            if out is not None:
                check_destination(out, overwrite=force)
        prepare_cpu_backend()
        try:
            result = run_benchmark(options)
        except ValueError as e:
            raise InputError(str(e)) from None
        markdown = to_markdown(result)
        typer.echo(markdown)
        if json_out:
            write_text(json_out, json.dumps(result, indent=2))
        if markdown_out:
            write_text(markdown_out, markdown)
