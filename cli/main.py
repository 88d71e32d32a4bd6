"""``mlx-aim``: pre-train, probe, embed and convert AIM models with MLX."""

from __future__ import annotations

import inspect

import typer

from mlx_aim.errors import exit_codes_table

from . import (
    bench,
    caption,
    convert,
    datasets,
    embed,
    index,
    kernels,
    models,
    probe,
    search,
    train,
    zero_shot,
)

app = typer.Typer(
    name="mlx-aim",
    help="AIM and AIMv2 image models in MLX: pre-train, probe, embed, zero-shot, caption, search, "
    "convert.",
    epilog=exit_codes_table(),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

# The command modules, each adding its command to ``app`` with ``register(app)``, in the order
# ``mlx-aim --help`` lists them. Each imports its heavy dependencies inside the command.
COMMANDS = (
    models,
    datasets,
    convert,
    train,
    probe,
    embed,
    zero_shot,
    caption,
    index,
    search,
    bench,
    kernels,
)


def version_callback(value: bool) -> None:
    if value:
        import mlx.core as mx

        import mlx_aim
        from mlx_aim.cpu.blas import blas_info
        from mlx_aim.cpu.native import native_status

        blas = blas_info() or "MLX's own"
        typer.echo(
            f"mlx-aim {mlx_aim.__version__} (mlx {mx.__version__}, {mx.default_device()}, "
            f"BLAS: {blas}, native CPU kernels: {native_status()})"
        )
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Show versions and exit."
    ),
) -> None:
    """AIM and AIMv2 image models in MLX."""


def reflowed(doc: str) -> str:
    """``doc`` with the lines of each prose paragraph joined, so that ``--help`` wraps them at the
    terminal's width (rich keeps every newline); paragraphs with indented lines (examples) stay."""
    paragraphs = doc.split("\n\n")
    return "\n\n".join(
        p if any(line[:1].isspace() for line in p.splitlines()) else " ".join(p.splitlines())
        for p in paragraphs
    )


for _command in COMMANDS:
    _command.register(app)
for _info in app.registered_commands:
    if _info.help is None and _info.callback is not None:
        _info.help = reflowed(inspect.getdoc(_info.callback) or "")

if __name__ == "__main__":
    app()
