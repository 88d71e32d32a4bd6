"""``mlx-aim caption``: caption images with an AIMv2 pre-training run's encoder and decoder."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mlx_aim.errors import ExitCode

from .embed import image_sources
from .errors import IMAGE_COMMAND_EXITS, err_console, fail, reported_errors, warn


def caption_command(
    paths: list[str] = typer.Argument(
        ...,
        help="Image files, folders (recursive), glob patterns or .txt path lists.",
        show_default=False,
    ),
    model: Path = typer.Option(
        ..., "--model", "-m", help="An `mlx-aim train --objective aimv2` output directory."
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="Most tokens per caption (default: the decoder's maximum)."
    ),
    temperature: float = typer.Option(
        0.0,
        "--temperature",
        "-t",
        help="0: greedy decoding; > 0 (at most 100): sample at this temperature.",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed of sampled decoding."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per forward pass."),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help='Write {"path": ..., "caption": ...} lines to this .jsonl file instead of printing '
        "path<TAB>caption lines.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary on stderr."),
) -> None:
    """Caption images, in input order.

    Examples:

      mlx-aim caption scenes/captioned/val/05000.png --model runs/aimv2-nano

      mlx-aim caption photos/ -m runs/aimv2-nano -t 0.7 -o captions.jsonl

    A file that cannot be read is named on stderr with its reason; every other file is captioned.
    """
    with reported_errors():
        code = _caption(paths, model, max_tokens, temperature, seed, batch_size, output, force)
        if not quiet and output is not None:
            err_console.print(f"captions written to {output}", highlight=False)
    if code:
        raise typer.Exit(int(code))


def _caption(paths, model, max_tokens, temperature, seed, batch_size, output, force) -> int:
    import mlx.core as mx
    import numpy as np

    from mlx_aim.data.images import ImageError, find_images, open_image
    from mlx_aim.io import check_destination, write_text
    from mlx_aim.tasks.caption import Captioner, check_temperature

    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise fail("--batch-size and --max-tokens must be >= 1")
    check_temperature(temperature)
    if output is not None:
        check_destination(output, overwrite=force, reads=[model])
    captioner = Captioner.from_run(model)
    files, errors = find_images(image_sources(paths))
    key = mx.random.key(seed)
    lines, records = [], []
    for start in range(0, len(files), batch_size):
        images, kept = [], []
        for path in files[start : start + batch_size]:
            try:
                images.append(captioner.preprocess(open_image(path)))
                kept.append(path)
            except ImageError as e:
                errors.append(e)
        if not images:
            continue
        key, sub = mx.random.split(key)
        captions = captioner.generate(mx.array(np.stack(images)), max_tokens, temperature, sub)
        for path, caption in zip(kept, captions, strict=True):
            records.append(json.dumps({"path": str(path), "caption": caption}))
            lines.append(f"{path}\t{caption}")
            if output is None:
                typer.echo(lines[-1])
    for error in errors:
        err_console.print(f"skipped {error}", highlight=False, soft_wrap=True, markup=False)
    if not records:
        raise fail("no readable image in the given paths")
    empty = sum(not json.loads(record)["caption"] for record in records)
    if empty:
        warn(
            f"{empty} of {len(lines)} captions are empty: the decoder ended them at once "
            "(a run trained for few steps)"
        )
    if output is not None:
        write_text(output, "\n".join(records) + "\n")
    return ExitCode.PARTIAL if errors else ExitCode.OK


def register(app: typer.Typer) -> None:
    """Add ``mlx-aim caption`` to ``app``."""
    app.command(
        "caption",
        epilog=IMAGE_COMMAND_EXITS,
    )(caption_command)
