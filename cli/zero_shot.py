"""``mlx-aim zero-shot``: classify images by label names with the AIMv2 LiT model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mlx_aim.errors import InputError
from mlx_aim.messages import plural
from mlx_aim.tasks.config import PATHS_HELP, ZeroShotConfig

from .embed import end_partial, find_files, skip_reporter
from .errors import IMAGE_COMMAND_EXITS, err_console, prepare_cpu_backend, reported_errors, warn
from .options import with_config_options
from .progress import progress_bars, working

_SHORT = {
    "labels": "-l",
    "top_k": "-k",
    "model": "-m",
    "output": "-o",
    "batch_size": "-b",
    "quiet": "-q",
}


def _line(path: str, best: list[tuple[str, float]]) -> str:
    return f"{path}  " + "  ".join(f"{label} {p:.3f}" for label, p in best)


def zero_shot_command(
    paths: list[str] | None = typer.Argument(None, help=PATHS_HELP, show_default=False),
    **settings: Any,
) -> None:
    """Classify images by label names (zero-shot) and print the top labels with probabilities.

    Examples:

      mlx-aim zero-shot cat.jpg --labels 'cat,dog,car'

      mlx-aim zero-shot photos/ --labels-file labels.txt --templates imagenet -o top.csv

      find . -name '*.jpg' | mlx-aim zero-shot - -l 'indoor,outdoor' --top-k 1 --json

      mlx-aim zero-shot -m runs/scenes-lit --eval "$(mlx-aim datasets scenes)/colour/val"

    A file that cannot be read is named on stderr and skipped (exit code 4).
    """
    from mlx_aim.tasks.zero_shot import load_classifier

    config = ZeroShotConfig(**settings)
    skipped, report = skip_reporter()
    if config.eval_dir is not None:
        with reported_errors():
            _evaluate(config, paths, report)
        end_partial(skipped, config.quiet)
        return
    with reported_errors():
        if not paths:
            raise InputError("give the images to classify, or --eval DIR")
        config.validate().check_output()
        labels, prompts = config.label_names(), config.prompts()
        files = find_files(paths, None, report)
        prepare_cpu_backend()
        with working(f"loading {config.model}", enabled=not config.quiet):
            classifier = load_classifier(config, labels, prompts)
        with progress_bars(enabled=not config.quiet and len(files) > config.batch_size) as bar:
            probs, result = classifier.classify_files(
                files,
                on_error=report,
                progress=bar("classifying", len(files)),
                num_workers=config.workers,
            )
        if not result.paths:
            raise InputError("none of the files could be read as an image")
        top = classifier.top_k(probs, config.top_k)
        _report(result.paths, top, config.as_json, config.output is None)
        if config.output is not None:
            _write(config.output, result.paths, top, len(labels), config.quiet)
    end_partial(skipped, config.quiet)


def _evaluate(config: ZeroShotConfig, paths: list[str] | None, report) -> None:
    """``--eval DIR``: zero-shot accuracy on class folders, printed (or one JSON object)."""
    import mlx.core as mx

    import mlx_aim
    from mlx_aim.tasks.zero_shot_eval import class_folders, evaluate, read_label_map

    if paths or config.labels or config.output is not None:
        raise InputError("--eval takes its images and labels from DIR: no paths, --labels or -o")
    config.validate()
    prompts = None
    if config.labels_file is not None:
        prompts = read_label_map(config.labels_file)
        folders = {f.name for f in class_folders(config.eval_dir)}
        if missing := sorted(set(prompts) - folders):
            raise InputError(
                f"{config.labels_file}: no class folder {', '.join(map(repr, missing))} in "
                f"{config.eval_dir}"
            )
    templates = config.prompts()
    prepare_cpu_backend()
    with working(f"loading {config.model}", enabled=not config.quiet):
        model = mlx_aim.load(config.model, dtype=getattr(mx, config.dtype))
    result = evaluate(
        model,
        config.eval_dir,
        templates,
        prompts=prompts,
        batch_size=config.batch_size,
        num_workers=config.workers,
        on_error=report,
    )
    for name in result.labels:
        if name not in result.per_class:
            warn(f"{config.eval_dir}/{name}: no readable images; still one of the labels")
    if config.as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    typer.echo(
        f"top-1 {100 * result.top1:.2f}% on {plural(result.images, 'image')}, "
        f"{plural(len(result.labels), 'class', 'classes')} (chance {100 / len(result.labels):.2f}%)"
    )
    if result.top5 is not None:
        typer.echo(f"top-5 {100 * result.top5:.2f}%")
    width = max(len(name) for name in result.per_class)
    for name, accuracy in result.per_class.items():
        typer.echo(f"  {name:<{width}}  {100 * accuracy:6.2f}%")
    if result.confused:
        typer.echo("most confused (true -> predicted: images):")
        for true, predicted, count in result.confused:
            typer.echo(f"  {true} -> {predicted}: {count}")


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


with_config_options(zero_shot_command, ZeroShotConfig, _SHORT)


def register(app: typer.Typer) -> None:
    """Add ``zero-shot`` to the ``mlx-aim`` app."""
    app.command(
        "zero-shot",
        epilog=IMAGE_COMMAND_EXITS,
    )(zero_shot_command)
