"""``mlx-aim convert``: import released PyTorch / Hugging Face checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from mlx_aim.errors import ExitCode, InputError, exit_codes_help
from mlx_aim.io import check_destination

from .errors import reported_errors, warn
from .progress import working

DTYPES = ("float32", "float16", "bfloat16")


def register(app: typer.Typer) -> None:
    """Add ``mlx-aim convert`` to ``app``."""
    app.command(
        "convert",
        epilog=exit_codes_help(
            ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.USAGE, ExitCode.OUTPUT, ExitCode.INTERRUPTED
        ),
    )(convert_command)


def convert_command(
    source: str = typer.Argument(
        ...,
        help="A .pth or .safetensors file, a directory holding one, a registry name or a hub id.",
    ),
    destination: Path = typer.Argument(..., help="Output directory (mlx-aim format)."),
    head: str | None = typer.Option(
        None,
        "--head",
        help="ml-aim probe-head .pth to merge with a backbone .pth; for a registry name of an "
        "AIMv1 release: 'last' or 'best'.",
    ),
    arch: str | None = typer.Option(
        None, "--arch", help="Registry architecture for sources without a config (.pth files)."
    ),
    probe_layers: str | None = typer.Option(
        None, "--probe-layers", help="Blocks the AIMv1 probe head averages: last, best or i,j,k."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (default: pinned)."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Store weights as float32, float16 or bfloat16 (default: as read)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace DESTINATION if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Convert a checkpoint into mlx-aim's format (config.json + model.safetensors).

    Examples:

      mlx-aim convert aimv2-large-patch14-224 models/aimv2-l

      mlx-aim convert aim_600m_2bimgs_attnprobe_backbone.pth models/aim-600M --head aim_600m_2bimgs_attnprobe_head_best_layers.pth --arch aim-600M

      mlx-aim convert path/to/hf-aimv2-checkpoint/ models/mine
    """
    import mlx.core as mx

    from mlx_aim.checkpoints.convert import convert

    with reported_errors():
        if dtype is not None and dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        check_destination(
            destination, overwrite=force, directory=True, reads=[source, *([head] if head else [])]
        )
        with working(f"converting {source}", enabled=not quiet):
            try:
                path = convert(
                    source,
                    destination,
                    head=head,
                    arch=arch,
                    probe_layers=probe_layers,
                    revision=revision,
                    dtype=getattr(mx, dtype) if dtype else None,
                    force=force,
                )
            except ValueError as e:  # unreadable metadata in the source (e.g. invalid JSON)
                raise InputError(f"{source}: {e}") from None
        _warn_if_lit_without_tokenizer(path)
    typer.echo(f"wrote {path}")


def _warn_if_lit_without_tokenizer(model: Path) -> None:
    """A LiT model converted without its tokenizer files cannot read text: say so now."""
    from mlx_aim.io import read_json
    from mlx_aim.text.clip_tokenizer import has_tokenizer

    if read_json(model / "config.json").get("model_type") == "aim_v2_lit" and not has_tokenizer(
        model
    ):
        warn(
            f"{model} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): "
            "zero-shot and embed --text will need them; copy them from the source checkpoint "
            "into it"
        )
