"""``mlx-aim zero-shot``: classify images by label names with the AIMv2 LiT model."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mlx_aim.errors import InputError
from mlx_aim.io import check_destination, read_text
from mlx_aim.messages import plural

from .embed import DTYPES, end_partial, find_files, skip_reporter
from .errors import EXIT_CODES_HELP, err_console, prepare_cpu_backend, reported_errors
from .progress import progress_bars, working


def _labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """Labels from ``--labels a,b,c`` and ``--labels-file`` (one a line, blank lines skipped)."""
    found = [label for label in (labels or "").split(",") if label.strip()]
    if labels_file is not None:
        found += [line for line in read_text(labels_file).splitlines() if line.strip()]
    if not found:
        raise InputError("give the labels: --labels 'cat,dog,car' or --labels-file FILE")
    return found


def _templates(template: str | None, templates: str | None) -> list[str]:
    from mlx_aim.tasks.zero_shot import TEMPLATE, template_set

    if template is not None and templates is not None:
        raise InputError("give --template or --templates, not both")
    if templates is not None:
        try:
            return template_set(templates)
        except ValueError as e:
            raise InputError(f"--templates: {e}") from None
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
    force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Classify images by label names (zero-shot) and print the top labels with probabilities.

    Examples:

      mlx-aim zero-shot cat.jpg --labels 'cat,dog,car'

      mlx-aim zero-shot photos/ --labels-file labels.txt --templates imagenet -o top.csv

      find . -name '*.jpg' | mlx-aim zero-shot - -l 'indoor,outdoor' --top-k 1 --json

    A file that cannot be read is named on stderr and skipped (exit code 4).
    """
    skipped, report = skip_reporter()
    with reported_errors():
        _check_options(top_k, batch_size, dtype, workers)
        if output is not None:
            _check_output(output, force, [model, *([labels_file] if labels_file else [])])
        label_names, prompts = _labels(labels, labels_file), _templates(template, templates)
        files = find_files(paths, None, report)
        prepare_cpu_backend()
        classifier = _load_classifier(model, dtype, label_names, prompts, batch_size, quiet)
        with progress_bars(enabled=not quiet and len(files) > batch_size) as bar:
            probs, result = classifier.classify_files(
                files, on_error=report, progress=bar("classifying", len(files)), num_workers=workers
            )
        if not result.paths:
            raise InputError("none of the files could be read as an image")
        top = classifier.top_k(probs, top_k)
        _report(result.paths, top, as_json, output is None)
        if output is not None:
            _write(output, result.paths, top, len(label_names), quiet)
    end_partial(skipped, quiet)


def _check_options(top_k: int, batch_size: int, dtype: str, workers: int) -> None:
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    for flag, value, low in (
        ("--top-k", top_k, 1),
        ("--batch-size", batch_size, 1),
        ("--workers", workers, 0),
    ):
        if value < low:
            raise InputError(f"{flag} must be >= {low}, not {value}")


def _check_output(output: Path, force: bool, reads: list) -> None:
    from mlx_aim.tasks.zero_shot import prediction_format

    try:
        prediction_format(output)
    except ValueError as e:
        raise InputError(str(e)) from None
    check_destination(output, overwrite=force, reads=reads)


def _load_classifier(
    model: str, dtype: str, labels: list[str], prompts: list[str], batch_size: int, quiet: bool
):
    import mlx.core as mx

    import mlx_aim
    from mlx_aim.tasks.zero_shot import ZeroShotClassifier

    with working(f"loading {model}", enabled=not quiet):
        net = mlx_aim.load(model, dtype=getattr(mx, dtype))
        try:
            return ZeroShotClassifier(net, labels, prompts, batch_size=batch_size)
        except ValueError as e:
            raise InputError(str(e)) from None


def _report(
    paths: list[str], top: list[list[tuple[str, float]]], as_json: bool, summary: bool
) -> None:
    for path, best in zip(paths, top, strict=True):
        if as_json:
            row = {"path": path, "labels": [b[0] for b in best], "probs": [b[1] for b in best]}
            typer.echo(json.dumps(row))
        elif summary:
            typer.echo(_line(path, best))


def _write(output: Path, paths: list[str], top: list, n_labels: int, quiet: bool) -> None:
    from mlx_aim.tasks.zero_shot import save_predictions

    save_predictions(output, paths, top)
    if not quiet:
        shown = min(len(top[0]), n_labels) if top else 0
        err_console.print(
            f"wrote the top {shown} of {plural(n_labels, 'label')} for "
            f"{plural(len(paths), 'image')} to {output}",
            highlight=False,
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    """Add ``zero-shot`` to the ``mlx-aim`` app."""
    app.command("zero-shot", epilog=EXIT_CODES_HELP)(zero_shot_command)
