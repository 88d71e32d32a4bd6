"""``mlx-aim embed``: embed images with an AIM / AIMv2 trunk."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mlx_aim.errors import InputError
from mlx_aim.io import check_destination
from mlx_aim.messages import plural

from .errors import (
    EXIT_CODES_HELP,
    ExitCode,
    err_console,
    prepare_cpu_backend,
    reported_errors,
    warn,
)
from .progress import progress_bars, working

if TYPE_CHECKING:
    from mlx_aim.data.images import ImageError
    from mlx_aim.tasks.embed import Embedder, EmbedResult

DTYPES = ("float32", "bfloat16", "float16")
SLOW_ON_CPU = "on a CPU, bfloat16, float16 and --quantize run 9-15x slower than float32"


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


def _texts(paths: list[str] | None, texts: list[str] | None, text_file: Path | None) -> list[str]:
    """``--text`` values, then the non-empty lines of ``--text-file``."""
    from mlx_aim.io import read_text

    if paths:
        raise InputError("give image paths or --text / --text-file, not both")
    lines = read_text(text_file).splitlines() if text_file is not None else []
    texts = [*(texts or []), *(line for line in lines if line.strip())]
    if not texts:
        raise InputError("no text to embed (--text or --text-file)")
    return texts


def _embed_texts(
    texts: list[str],
    model: str,
    output: Path | None,
    normalize: bool,
    dtype: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """``mlx-aim embed --text``: text embeddings of a LiT model, written as image embeddings are."""
    import mlx.core as mx

    import mlx_aim
    from mlx_aim.tasks.embed import embed_texts, save_embeddings

    with working(f"loading {model}", enabled=not quiet):
        net = mlx_aim.load(model, dtype=getattr(mx, dtype))
    try:
        vectors = embed_texts(net, texts, normalize=normalize)
    except ValueError as e:  # a model without a text tower
        raise InputError(f"--model {model}: {e}") from None
    for string, vector in zip(texts, vectors, strict=True):
        if as_json:
            typer.echo(json.dumps({"text": string, "embedding": vector.tolist()}))
        elif output is None:
            typer.echo(_summary(string, vector))
    if output is not None:
        written = save_embeddings(output, vectors, texts)
        if not quiet:
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


def _pooling(pool: str, tokens: bool, layers: str | None) -> str:
    """--pool with its shorthands applied: --tokens, and --layers alone meaning layers."""
    if tokens:
        return "tokens"
    return "layers" if layers is not None and pool == "auto" else pool


def _check_options(
    pool: str, layers: str | None, dtype: str, quantize: int | None, batch_size: int, workers: int
) -> None:
    from mlx_aim.tasks.embed import POOLS

    if pool not in POOLS:
        raise InputError(f"--pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if layers is not None and pool != "layers":
        raise InputError(f"--layers only applies to --pool layers, not --pool {pool}")
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize is not None and quantize not in (4, 8):
        raise InputError(f"--quantize must be 4 or 8, not {quantize}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, not {batch_size}")
    if workers < 0:
        raise InputError(f"--workers must be >= 0, not {workers}")


def _check_output(output: Path, force: bool, reads: list) -> None:
    """Refuse, before any work, an output that cannot or must not be written."""
    from mlx_aim.tasks.embed import output_files

    for file in output_files(output):
        check_destination(file, overwrite=force, reads=reads)


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


def _load_embedder(
    model: str,
    *,
    dtype: str,
    quantize: int | None,
    pool: str,
    layers: str | None,
    normalize: bool,
    batch_size: int,
    output: Path | None,
) -> Embedder:
    """The model loaded (and quantized) as an :class:`Embedder`; bad options are InputErrors."""
    import mlx.core as mx

    import mlx_aim
    from mlx_aim.tasks.embed import Embedder, output_format
    from mlx_aim.tasks.embed import quantize as quantize_model
    from mlx_aim.tasks.features import vision_model
    from mlx_aim.tasks.probe import resolve_layers

    net = mlx_aim.load(model, dtype=getattr(mx, dtype))
    try:
        chosen = None if layers is None else resolve_layers(layers, vision_model(net).args, model)
        if quantize is not None:
            quantize_model(net, quantize)
        embedder = Embedder(
            net, pool=pool, layers=chosen, normalize=normalize, batch_size=batch_size
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    if embedder.ragged and output is not None and output_format(output) != ".jsonl":
        raise InputError(
            f"{output}: native-resolution tokens differ in count between images; write them as "
            ".jsonl"
        )
    return embedder


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


def _warn_if_slow(dtype: str, quantize: int | None) -> None:
    import mlx.core as mx

    prepare_cpu_backend()
    if (dtype != "float32" or quantize is not None) and mx.default_device().type == mx.cpu:
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
    paths: list[str] | None = typer.Argument(
        None,
        help="Image files, folders (recursive), glob patterns, .txt path lists, or - to read "
        "paths from standard input.",
        show_default=False,
    ),
    model: str = typer.Option(
        "aimv2-large-patch14-224",
        "--model",
        "-m",
        help="A registry name, an mlx-aim model directory (convert, train or probe output) or a "
        "checkpoint file.",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Write the embeddings: .npy (+ <stem>.paths.txt), .safetensors (paths in the "
        "metadata) or .jsonl. Without it a summary per image is printed.",
    ),
    pool: str = typer.Option(
        "auto",
        "--pool",
        help="mean (of final tokens; AIMv2 default), head (the model's attention pool), layers "
        "(token mean of averaged block outputs; AIMv1 default), tokens (all patch tokens), "
        "projection (LiT: the image embedding in the text space; its default) or auto.",
    ),
    tokens: bool = typer.Option(False, "--tokens", help="Shorthand for --pool tokens."),
    layers: str | None = typer.Option(
        None, "--layers", help="Blocks for --pool layers: last, best or i,j,k."
    ),
    normalize: bool = typer.Option(False, "--normalize", help="Scale embeddings to unit norm."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per forward pass."),
    dtype: str = typer.Option(
        "float32", "--dtype", help=f"float32, bfloat16 or float16 ({SLOW_ON_CPU})."
    ),
    quantize: int | None = typer.Option(
        None,
        "--quantize",
        help="Quantize the linear layers to 4 or 8 bits (mlx.nn.quantize; saves memory on Apple "
        "GPUs, slower on a CPU).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object per image with the full vector."
    ),
    workers: int = typer.Option(2, "--workers", help="Image decoding threads (0: none)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    text: list[str] | None = typer.Option(
        None,
        "--text",
        help="Embed this text instead of images (repeatable; LiT models). The texts take the "
        "place of the paths in the output.",
    ),
    text_file: Path | None = typer.Option(
        None, "--text-file", help="Embed each line of this file as a text (LiT models)."
    ),
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
    with reported_errors():
        _check_options(_pooling(pool, tokens, layers), layers, dtype, quantize, batch_size, workers)
        if output is not None:
            _check_output(output, force, [model, *([text_file] if text_file else [])])
        if text or text_file is not None:
            texts = _texts(paths, text, text_file)
            return _embed_texts(texts, model, output, normalize, dtype, as_json, quiet)
        if not paths:
            raise InputError("give image paths (or --text / --text-file with a LiT model)")
    embedder_options = {
        "dtype": dtype,
        "quantize": quantize,
        "pool": _pooling(pool, tokens, layers),
        "layers": layers,
        "normalize": normalize,
        "batch_size": batch_size,
        "output": output,
    }
    _embed_images(paths, model, embedder_options, as_json=as_json, workers=workers, quiet=quiet)


def _embed_images(
    paths: list[str],
    model: str,
    embedder_options: dict[str, Any],
    *,
    as_json: bool,
    workers: int,
    quiet: bool,
) -> None:
    """Embed the image files of ``paths`` and print or write them; ``embedder_options`` are the
    keyword arguments of :func:`_load_embedder` (``output`` among them)."""
    skipped, report = skip_reporter()
    output = embedder_options["output"]
    with reported_errors():
        files = find_files(paths, output, report)
        _warn_if_slow(embedder_options["dtype"], embedder_options["quantize"])
        with working(f"loading {model}", enabled=not quiet):
            embedder = _load_embedder(model, **embedder_options)
        result = _embed(embedder, files, report, workers, quiet)
        if as_json or output is None:
            _print(result, as_json)
        if output is not None:
            _write(output, result, embedder.pool, quiet)
    end_partial(skipped, quiet)
