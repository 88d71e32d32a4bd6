"""``mlx-aim embed``: embed images with an AIM / AIMv2 trunk."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mlx_aim.errors import InputError
from mlx_aim.messages import plural
from mlx_aim.tasks.config import PATHS_HELP, SLOW_ON_CPU, EmbedConfig

from .errors import (
    EXIT_CODES_HELP,
    ExitCode,
    err_console,
    prepare_cpu_backend,
    reported_errors,
    warn,
)
from .options import with_config_options
from .progress import progress_bars, working

if TYPE_CHECKING:
    from mlx_aim.data.images import ImageError
    from mlx_aim.tasks.embed import Embedder, EmbedResult

_SHORT = {"model": "-m", "output": "-o", "batch_size": "-b", "quiet": "-q"}


def register(app: typer.Typer) -> None:
    """Add ``mlx-aim embed`` to ``app``."""
    app.command("embed", epilog=EXIT_CODES_HELP)(embed_command)


def _sources(paths: list[str]) -> list[str]:
    """The command-line sources with ``-`` replaced by the paths read from standard input."""
    sources: list[str] = []
    for source in paths:
        if source == "-":
            sources.extend(line.strip() for line in sys.stdin if line.strip())
        else:
            sources.append(source)
    return sources


def skip_reporter() -> tuple[list[ImageError], Callable[[ImageError], None]]:
    """A list of skipped files and the function that names one on stderr and records it."""
    skipped: list[ImageError] = []

    def report(error: ImageError) -> None:
        skipped.append(error)
        err_console.print(f"skipped {error}", highlight=False, soft_wrap=True, markup=False)

    return skipped, report


def end_partial(skipped: list[ImageError], quiet: bool) -> None:
    """Exit 4 (partial) after the outputs are written, when some input files were skipped."""
    if skipped:
        if not quiet:
            err_console.print(f"{plural(len(skipped), 'unreadable file')} skipped", highlight=False)
        raise typer.Exit(ExitCode.PARTIAL)


def _embed_texts(texts: list[str], config: EmbedConfig) -> None:
    """``mlx-aim embed --text``: text embeddings of a LiT model, written as image embeddings are."""
    import mlx.core as mx

    import mlx_aim
    from mlx_aim.tasks.embed import embed_texts, save_embeddings

    with working(f"loading {config.model}", enabled=not config.quiet):
        net = mlx_aim.load(config.model, dtype=getattr(mx, config.dtype))
    try:
        vectors = embed_texts(net, texts, normalize=config.normalize)
    except ValueError as e:  # a model without a text tower
        raise InputError(f"--model {config.model}: {e}") from None
    for string, vector in zip(texts, vectors, strict=True):
        if config.as_json:
            typer.echo(json.dumps({"text": string, "embedding": vector.tolist()}))
        elif config.output is None:
            typer.echo(_summary(string, vector))
    if config.output is not None:
        written = save_embeddings(config.output, vectors, texts)
        if not config.quiet:
            names = " and ".join(str(f) for f in reversed(written))
            err_console.print(
                f"wrote {plural(len(texts), 'text embedding')} to {names}",
                highlight=False,
                soft_wrap=True,
            )


def _summary(path: str, vector) -> str:
    import numpy as np

    values = np.asarray(vector)
    first = values.reshape(-1, values.shape[-1])[0][:6]
    norm = float(np.linalg.norm(values, axis=-1).mean())
    norm_name = "norm" if values.ndim == 1 else "mean token norm"
    shown = ", ".join(f"{v:.4f}" for v in first)
    return f"{path}  shape {tuple(values.shape)}  {norm_name} {norm:.4f}  [{shown}, ...]"


def find_files(
    paths: list[str], output: Path | None, report: Callable[[ImageError], None]
) -> list[Path]:
    """The image files named by ``paths``; refuses names that ``output`` cannot record."""
    from mlx_aim.data.images import find_images
    from mlx_aim.tasks.embed import check_sources

    files, errors = find_images(_sources(paths))
    for error in errors:
        report(error)
    if not files:
        raise InputError("no image files found in the given paths")
    if output is not None:
        check_sources(output, files)
    return files


def _embed(
    embedder: Embedder,
    files: list[Path],
    report: Callable[[ImageError], None],
    workers: int,
    quiet: bool,
) -> EmbedResult:
    """Embed ``files`` with a progress bar; refuses a result with no readable image."""
    with progress_bars(enabled=not quiet and len(files) > embedder.batch_size) as bar:
        result = embedder.embed_files(
            files, on_error=report, progress=bar("embedding", len(files)), num_workers=workers
        )
    if not result.paths:
        raise InputError("none of the files could be read as an image")
    return result


def _warn_if_slow(config: EmbedConfig) -> None:
    import mlx.core as mx

    prepare_cpu_backend()
    slow = config.dtype != "float32" or config.quantize is not None
    if slow and mx.default_device().type == mx.cpu:
        warn(f"{SLOW_ON_CPU}; drop --dtype/--quantize here for speed")


def _write(output: Path, result: EmbedResult, pool: str, quiet: bool) -> None:
    from mlx_aim.tasks.embed import save_embeddings

    written = save_embeddings(output, result.embeddings, result.paths)
    if not quiet:
        count = plural(len(result.paths), "embedding")
        names = " and ".join(str(f) for f in reversed(written))
        err_console.print(
            f"wrote {count} ({pool} pooling) to {names}", highlight=False, soft_wrap=True
        )


def _print(result: EmbedResult, as_json: bool) -> None:
    for path, vector in zip(result.paths, result.embeddings, strict=True):
        if as_json:
            typer.echo(json.dumps({"path": path, "embedding": vector.tolist()}))
        else:
            typer.echo(_summary(path, vector))


def embed_command(
    paths: list[str] | None = typer.Argument(None, help=PATHS_HELP, show_default=False),
    **settings: Any,
) -> None:
    """Embed images (or texts, with a LiT model) and print or save the vectors in input order.

    Examples:

      mlx-aim embed cat.jpg

      mlx-aim embed photos/ -o photos.npy --normalize

      find . -name '*.png' | mlx-aim embed - --model runs/aim-nano -o emb.safetensors

      mlx-aim embed 'shots/*.jpg' --model aimv2-large-patch14-native --json > emb.jsonl

    A file that cannot be read is named on stderr with its reason and skipped (exit code 4);
    every other file is embedded and written.
    """
    config = EmbedConfig(**settings)
    with reported_errors():
        config.validate().check_output()
        if config.embeds_text:
            return _embed_texts(config.texts(paths), config)
        if not paths:
            raise InputError("give image paths (or --text / --text-file with a LiT model)")
    _embed_images(paths, config)


def _embed_images(paths: list[str], config: EmbedConfig) -> None:
    """Embed the image files of ``paths`` and print or write them."""
    from mlx_aim.tasks.embed import load_embedder

    skipped, report = skip_reporter()
    output = config.output
    with reported_errors():
        files = find_files(paths, output, report)
        _warn_if_slow(config)
        with working(f"loading {config.model}", enabled=not config.quiet):
            embedder = load_embedder(config)
        result = _embed(embedder, files, report, config.workers, config.quiet)
        if config.as_json or output is None:
            _print(result, config.as_json)
        if output is not None:
            _write(output, result, embedder.pool, config.quiet)
    end_partial(skipped, config.quiet)


with_config_options(embed_command, EmbedConfig, _SHORT)
