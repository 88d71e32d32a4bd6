"""``mlx-aim``: pre-train, probe, embed and convert AIM models with MLX."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="mlx-aim",
    help="AIM and AIMv2 image models in MLX: pre-train, probe, embed, convert.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


@app.command("models")
def models_command() -> None:
    """List the named architectures and released checkpoints.

    Example: [bold]mlx-aim models[/bold]
    """
    from mlx_aim.registry import REGISTRY

    table = Table("name", "type", "width", "depth", "heads", "patch", "size", "weights")
    for name, entry in REGISTRY.items():
        c = entry.config
        weights = entry.checkpoint.repo if entry.checkpoint else "train it yourself"
        table.add_row(
            name,
            c["model_type"],
            str(c["embed_dim"]),
            str(c["num_blocks"]),
            str(c["num_heads"]),
            str(c["patch_size"]),
            str(c["image_size"]),
            weights,
        )
    Console().print(table)


def version_callback(value: bool) -> None:
    if value:
        import mlx.core as mx

        import mlx_aim
        from mlx_aim.blas import blas_info

        blas = blas_info() or "MLX's own"
        typer.echo(
            f"mlx-aim {mlx_aim.__version__} (mlx {mx.__version__}, {mx.default_device()}, "
            f"BLAS: {blas})"
        )
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Show versions and exit."
    ),
) -> None:
    """AIM and AIMv2 image models in MLX."""


# Sub-commands live in their own modules and register themselves on ``app``.
for _module in ("convert", "probe", "embed", "bench", "train"):
    __import__(f"cli.{_module}")
__import__("cli.caption").caption.register(app)
