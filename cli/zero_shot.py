"""``mlx-aim zero-shot``: classify images by label names with the AIMv2 LiT model."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .embed import DTYPES, EXIT_SOME_FAILED, input_images
from .errors import EXIT_BAD_INPUT, err_console, fail, user_errors
from .progress import progress_bars


def _labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """Labels from ``--labels a,b,c`` and ``--labels-file`` (one a line, blank lines skipped)."""
    found = [label for label in (labels or "").split(",") if label.strip()]
    if labels_file is not None:
        try:
            text = labels_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise fail(f"{labels_file}: cannot read the labels ({e})") from None
        found += [line for line in text.splitlines() if line.strip()]
    if not found:
        raise fail("give the labels: --labels 'cat,dog,car' or --labels-file FILE")
    return found


def _templates(template: str | None, templates: str | None) -> list[str]:
    from mlx_aim.zero_shot import TEMPLATE, template_set

    if template is not None and templates is not None:
        raise fail("give --template or --templates, not both")
    if templates is not None:
        try:
            return template_set(templates)
        except ValueError as e:
            raise fail(f"--templates: {e}") from None
    return [template if template is not None else TEMPLATE]


def _line(path: str, best: list[tuple[str, float]]) -> str:
    return f"{path}  " + "  ".join(f"{label} {p:.3f}" for label, p in best)


def zero_shot_command(
    paths: list[str] = typer.Argument(
        ...,
        help="Image files, folders (recursive), glob patterns, .txt path lists, or - to read "
        "paths from standard input.",
        show_default=False,
    ),
    labels: str | None = typer.Option(
        None, "--labels", "-l", help="Comma-separated label names, e.g. 'cat,dog,car'."
    ),
    labels_file: Path | None = typer.Option(
        None, "--labels-file", help="A text file with one label a line (added to --labels)."
    ),
    template: str | None = typer.Option(
        None,
        "--template",
        help="Prompt with {} standing for the label (default: 'a photo of a {}.').",
    ),
    templates: str | None = typer.Option(
        None,
        "--templates",
        help="A prompt ensemble: imagenet (CLIP's 80 ImageNet templates, averaged per label).",
    ),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Labels shown per image."),
    model: str = typer.Option(
        "aimv2-large-patch14-224-lit",
        "--model",
        "-m",
        help="The LiT registry name, or a LiT checkpoint directory or file.",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Write the top labels: .jsonl (path, labels, probs) or .csv (path, rank, label, "
        "probability).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object per image (path, labels, probs)."
    ),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per forward pass."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    workers: int = typer.Option(2, "--workers", help="Image decoding threads."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Classify images by label names (zero-shot) and print the top labels with probabilities.

    Examples:

      mlx-aim zero-shot cat.jpg --labels 'cat,dog,car'

      mlx-aim zero-shot photos/ --labels-file labels.txt --templates imagenet -o top.csv

      find . -name '*.jpg' | mlx-aim zero-shot - -l 'indoor,outdoor' --top-k 1 --json

    Exit codes: 0 every image classified; 1 nothing classified (bad option, model, labels or output, or no readable image); 2 usage error; 3 some files could not be read (named on stderr), all others were classified and written.
    """
    import mlx.core as mx

    import mlx_aim
    from mlx_aim.zero_shot import ZeroShotClassifier, prediction_format, save_predictions

    if dtype not in DTYPES:
        raise fail(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if top_k < 1 or batch_size < 1:
        raise fail("--top-k and --batch-size must be >= 1")
    try:
        if output is not None:
            prediction_format(output)
    except ValueError as e:
        raise fail(str(e)) from None
    label_names, prompts = _labels(labels, labels_file), _templates(template, templates)

    files, errors, report = input_images(paths)

    with user_errors():
        net = mlx_aim.load(model, dtype=getattr(mx, dtype))
        try:
            classifier = ZeroShotClassifier(net, label_names, prompts, batch_size=batch_size)
        except ValueError as e:
            raise fail(str(e)) from None

    with progress_bars(enabled=not quiet and len(files) > batch_size) as bar:
        probs, result = classifier.classify_files(
            files, on_error=report, progress=bar("classifying", len(files)), num_workers=workers
        )
    if not result.paths:
        raise fail(f"none of the {len(files)} image file(s) could be read", EXIT_BAD_INPUT)
    top = classifier.top_k(probs, top_k)
    for path, best in zip(result.paths, top, strict=True):
        if as_json:
            row = {"path": path, "labels": [b[0] for b in best], "probs": [b[1] for b in best]}
            typer.echo(json.dumps(row))
        elif output is None:
            typer.echo(_line(path, best))
    if output is not None:
        with user_errors():
            save_predictions(output, result.paths, top)
        if not quiet:
            err_console.print(
                f"wrote the top {min(top_k, len(label_names))} of {len(label_names)} labels for "
                f"{len(result.paths)} image(s) to {output}",
                highlight=False,
                soft_wrap=True,
            )
    if errors:
        if not quiet:
            err_console.print(f"{len(errors)} file(s) skipped", highlight=False)
        raise typer.Exit(EXIT_SOME_FAILED)


def register(app: typer.Typer) -> None:
    """Add ``zero-shot`` to the ``mlx-aim`` app."""
    app.command("zero-shot")(zero_shot_command)
