"""``mlx-aim models``: the named architectures and released checkpoints, as plain columns."""

from __future__ import annotations

import typer

from mlx_aim.errors import ExitCode, exit_codes_help

from .errors import reported_errors

HEADER = ("name", "aim", "dim", "depth", "heads", "patch", "px", "weights")


def register(app: typer.Typer) -> None:
    """Add ``mlx-aim models`` to ``app``."""
    app.command("models", epilog=exit_codes_help(ExitCode.OK, ExitCode.USAGE))(models_command)


def model_rows() -> list[tuple[str, ...]]:
    """One row of :data:`HEADER` per registry entry."""
    from mlx_aim.checkpoints.registry import REGISTRY

    rows = []
    for name, entry in REGISTRY.items():
        c = entry.config.get("vision", entry.config)  # LiT: its image tower
        numbers = (
            c["embed_dim"],
            c["num_blocks"],
            c["num_heads"],
            c["patch_size"],
            c["image_size"],
        )
        family = entry.config["model_type"].removeprefix("aim_").replace("v2_lit", "lit")
        rows.append((name, family, *map(str, numbers), "hub" if entry.checkpoint else "train"))
    return rows


def columns(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Header and rows as aligned text lines: every value whole, number columns right-aligned."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    numeric = [all(row[i].isdigit() for row in rows) for i in range(len(header))]
    return [
        "  ".join(
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(row, widths, numeric, strict=True)
        ).rstrip()
        for row in table
    ]


def models_command() -> None:
    """List the named architectures and released checkpoints.

    aim: v1 (AIM), v2 (AIMv2) or lit (AIMv2 with a LiT text tower; the columns describe its image tower); dim, depth, heads: the trunk's width, blocks and attention heads;
    patch and px: patch and image size in pixels; weights: hub (released: --model NAME reads them
    from the Hugging Face repo named at the end) or train (an architecture for mlx-aim train).

    Example: [bold]mlx-aim models[/bold]
    """
    from mlx_aim.checkpoints.registry import REGISTRY

    with reported_errors():
        for line in columns(HEADER, model_rows()):
            typer.echo(line)
        repos = {e.checkpoint.repo.replace(n, "NAME") for n, e in REGISTRY.items() if e.checkpoint}
        typer.echo(f"\nhub repos: {', '.join(sorted(repos))} (NAME as listed)")
