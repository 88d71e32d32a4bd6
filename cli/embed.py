"""``mlx-aim embed``: embed images with an AIM / AIMv2 trunk."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from .errors import EXIT_BAD_INPUT, err_console, fail, user_errors
from .main import app
from .progress import progress_bars

EXIT_SOME_FAILED = 3
DTYPES = ("float32", "bfloat16", "float16")


def _sources(paths: list[str]) -> list[str]:
    """The command-line sources with ``-`` replaced by the paths read from standard input."""
    sources: list[str] = []
    for source in paths:
        if source == "-":
            sources.extend(line.strip() for line in sys.stdin if line.strip())
        else:
            sources.append(source)
    return sources


def input_images(paths: list[str]) -> tuple[list[str], list, Callable[[Any], None]]:
    """The image files of the command-line sources, the skipped ones so far, and the function
    that names a skipped file on stderr and records it (for the files that fail to decode)."""
    from mlx_aim.images import find_images

    errors = []

    def report(error) -> None:
        errors.append(error)
        err_console.print(f"skipped {error}", highlight=False, soft_wrap=True, markup=False)

    files, find_errors = find_images(_sources(paths))
    for error in find_errors:
        report(error)
    if not files:
        raise fail("no image files found in the given paths")
    return files, errors, report


def _summary(path: str, vector) -> str:
    import numpy as np

    values = np.asarray(vector)
    first = values.reshape(-1, values.shape[-1])[0][:6]
    norm = float(np.linalg.norm(values, axis=-1).mean())
    norm_name = "norm" if values.ndim == 1 else "mean token norm"
    shown = ", ".join(f"{v:.4f}" for v in first)
    return f"{path}  shape {tuple(values.shape)}  {norm_name} {norm:.4f}  [{shown}, ...]"


def _texts(paths: list[str] | None, texts: list[str] | None, text_file: Path | None) -> list[str]:
    """``--text`` values, then the non-empty lines of ``--text-file``."""
    if paths:
        raise fail("give images or --text / --text-file, not both")
    if not texts and text_file is None:
        raise fail("give image paths, or --text / --text-file")
    texts = list(texts or [])
    if text_file is not None:
        try:
            lines = text_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise fail(f"{text_file}: cannot read the texts ({e})") from None
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise fail("no text to embed")
    return texts


def _embed_texts(
    paths: list[str] | None,
    text: list[str] | None,
    text_file: Path | None,
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
    from mlx_aim.embed import embed_texts, output_format, save_embeddings

    texts = _texts(paths, text, text_file)
    if dtype not in DTYPES:
        raise fail(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    try:
        if output is not None:
            output_format(output)
    except ValueError as e:
        raise fail(str(e)) from None
    with user_errors():
        net = mlx_aim.load(model, dtype=getattr(mx, dtype))
        try:
            vectors = embed_texts(net, texts, normalize=normalize)
        except ValueError as e:
            raise fail(str(e)) from None
    for string, vector in zip(texts, vectors, strict=True):
        if as_json:
            typer.echo(json.dumps({"text": string, "embedding": vector.tolist()}))
        elif output is None:
            typer.echo(_summary(string, vector))
    if output is not None:
        with user_errors():
            written = save_embeddings(output, vectors, texts)
        if not quiet:
            err_console.print(
                f"wrote {len(texts)} text embeddings to {written[-1]}",
                highlight=False,
                soft_wrap=True,
            )


@app.command("embed")
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
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    quantize: int | None = typer.Option(
        None, "--quantize", help="Quantize the linear layers to 4 or 8 bits (mlx.nn.quantize)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object per image with the full vector."
    ),
    workers: int = typer.Option(2, "--workers", help="Image decoding threads."),
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
    """Embed images (or texts, with a LiT model) and print or save the vectors (in input order,
    with their paths).

    Examples:

      mlx-aim embed cat.jpg

      mlx-aim embed photos/ -o photos.npy --normalize

      find . -name '*.png' | mlx-aim embed - --model runs/aim-nano -o emb.safetensors

      mlx-aim embed 'shots/*.jpg' --model aimv2-large-patch14-native --json > emb.jsonl

      mlx-aim embed --text 'a photo of a cat' --model aimv2-large-patch14-224-lit --normalize

    A file that cannot be read is named on stderr with its reason; every other file is embedded.

    Exit codes: 0 every image embedded; 1 nothing embedded (bad option, model or output, or no readable image); 2 usage error; 3 some files could not be read (named on stderr), all others were embedded and written.
    """
    import mlx.core as mx

    import mlx_aim
    from mlx_aim.embed import Embedder, output_format, paths_file, save_embeddings
    from mlx_aim.embed import quantize as quantize_model
    from mlx_aim.features import vision_model
    from mlx_aim.probe import resolve_layers

    if text or text_file is not None or not paths:
        return _embed_texts(paths, text, text_file, model, output, normalize, dtype, as_json, quiet)
    if tokens:
        pool = "tokens"
    if layers is not None and pool == "auto":
        pool = "layers"
    if dtype not in DTYPES:
        raise fail(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize is not None and quantize not in (4, 8):
        raise fail(f"--quantize must be 4 or 8, not {quantize}")
    if batch_size < 1:
        raise fail(f"--batch-size must be >= 1, not {batch_size}")
    try:
        if output is not None:
            output_format(output)
    except ValueError as e:
        raise fail(str(e)) from None

    files, errors, report = input_images(paths)

    with user_errors():
        net = mlx_aim.load(model, dtype=getattr(mx, dtype))
        try:
            chosen = None
            if layers is not None:
                chosen = resolve_layers(layers, vision_model(net).args, model)
            if quantize is not None:
                quantize_model(net, quantize)
            embedder = Embedder(
                net, pool=pool, layers=chosen, normalize=normalize, batch_size=batch_size
            )
            if embedder.ragged and output is not None and output.suffix.lower() != ".jsonl":
                raise ValueError(
                    "native-resolution tokens differ in count between images: write them as .jsonl"
                )
        except ValueError as e:
            raise fail(str(e)) from None

    with progress_bars(enabled=not quiet and len(files) > batch_size) as bar:
        result = embedder.embed_files(
            files, on_error=report, progress=bar("embedding", len(files)), num_workers=workers
        )

    if not result.paths:
        raise fail(f"none of the {len(files)} image file(s) could be read", EXIT_BAD_INPUT)
    if as_json:
        for path, vector in zip(result.paths, result.embeddings, strict=True):
            typer.echo(json.dumps({"path": path, "embedding": vector.tolist()}))
    elif output is None:
        for path, vector in zip(result.paths, result.embeddings, strict=True):
            typer.echo(_summary(path, vector))
    if output is not None:
        with user_errors():
            written = save_embeddings(output, result.embeddings, result.paths)
        if not quiet:
            extra = f" and {paths_file(output)}" if output_format(output) == ".npy" else ""
            err_console.print(
                f"wrote {len(result.paths)} embeddings ({embedder.pool} pooling) to "
                f"{written[-1]}{extra}",
                highlight=False,
                soft_wrap=True,
            )
    if errors:
        if not quiet:
            err_console.print(f"{len(errors)} file(s) skipped", highlight=False)
        raise typer.Exit(EXIT_SOME_FAILED)
