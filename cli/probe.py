"""``mlx-aim probe``: train or evaluate an attentive (or linear) probe on a frozen trunk."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import typer

from .errors import EXIT_CODES_HELP, err_console, fail, user_errors
from .progress import progress_bars


@contextlib.contextmanager
def _bad_input() -> Iterator[None]:
    """Known user errors and invalid data/settings (ValueError) as one line, exit code 1."""
    with user_errors():
        try:
            yield
        except ValueError as e:
            raise fail(str(e)) from None


def _default_output(model: str, head: str) -> Path:
    return Path(f"{Path(model.rstrip('/')).name}-{head}-probe")


def probe_command(
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="Trunk: a registry name, an mlx-aim model directory (convert or train output) or a "
        "checkpoint file.",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        "-d",
        help="Image folder: <class>/<images>, or train/<class>/ and val/<class>/. "
        "Default: the built-in digits.",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Directory for the classifier, classes.json and probe_report.json "
        "(default: ./<model>-<head>-probe; with --eval-only: nothing is written unless given).",
    ),
    epochs: int = typer.Option(20, "--epochs", "-e", help="Training epochs."),
    batch_size: int = typer.Option(128, "--batch-size", "-b", help="Batch size."),
    head: str = typer.Option("attentive", "--head", help="attentive (paper) or linear (baseline)."),
    layers: str = typer.Option(
        "last",
        "--layers",
        help="Blocks whose outputs are averaged: last (last 6), best (released AIMv1 only) or "
        "i,j,k (negative counts from the end).",
    ),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(0.05, "--weight-decay", help="AdamW weight decay."),
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs", help="Linear warm-up length."),
    augment: bool = typer.Option(
        False,
        "--augment",
        help="Random resized crops and flips; runs the trunk every step (no feature cache).",
    ),
    val_fraction: float = typer.Option(
        0.2, "--val-fraction", help="Held-out fraction when the data has no val/ folder."
    ),
    eval_only: bool = typer.Option(
        False,
        "--eval-only",
        help="Evaluate a model that already has a classifier head, on val/ when the data has "
        "one, else on every image.",
    ),
    random_init: bool = typer.Option(
        False,
        "--random-init",
        help="Probe a randomly initialised trunk of the model's architecture (a baseline).",
    ),
    cache: bool = typer.Option(
        True, "--cache/--no-cache", help="Cache the trunk's features on disk (float16)."
    ),
    cache_dir: Path | None = typer.Option(
        None,
        "--cache-dir",
        help="Feature cache (default: $MLX_AIM_CACHE/features or ~/.cache/mlx-aim/features).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the head's initialisation and batches."),
    workers: int = typer.Option(2, "--workers", help="Image decoding threads."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Train an attentive probe on a frozen trunk, or evaluate a classifier (--eval-only).

    Reports top-1 / top-5 on the validation split every epoch and writes OUTPUT, a model directory that mlx_aim.load() returns as the full classifier (trunk + head), with classes.json and probe_report.json. Without --augment the trunk's features are computed once and cached, so more epochs and reruns only cost the head.

    Examples:

      mlx-aim probe --model runs/aim-nano   (the built-in digits)

      mlx-aim probe --model aim-nano --random-init   (a random trunk as baseline)

      mlx-aim probe --data ~/flowers --model aimv2-large-patch14-224 --epochs 30 -o probes/flowers

      mlx-aim probe --data ~/imagenet --model aim-600M --layers best --eval-only

    Exit codes: 0 done; 1 bad input (model, data, option; one line on stderr); 2 usage error.
    """
    import mlx_aim
    from mlx_aim.datasets import builtin_dataset
    from mlx_aim.probe import (
        Hooks,
        ProbeConfig,
        evaluate_classifier,
        load_dataset,
        random_model,
        read_classes,
        save_evaluation,
        save_probe,
        train_probe,
    )
    from mlx_aim.registry import LAPTOP_ARCHITECTURES

    if eval_only and random_init:
        raise fail("--eval-only and --random-init exclude each other")
    if not eval_only:
        output = output or _default_output(model, head)
        if output.exists() and not force:
            raise fail(f"{output} already exists (use --force to replace it)")

    def skipped(error) -> None:
        err_console.print(f"skipped {error}", highlight=False, soft_wrap=True, markup=False)

    with _bad_input():
        config = ProbeConfig(
            head=head,
            layers=layers,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            augment=augment,
            val_fraction=val_fraction,
            seed=seed,
            cache=cache,
            cache_dir=str(cache_dir) if cache_dir else None,
            num_workers=workers,
        )
        config.validate()
        data_dir = data if data is not None else builtin_dataset("digits")
        # --eval-only scores val/ when the data has one, else every image
        dataset = load_dataset(data_dir, 0.0 if eval_only else val_fraction, seed)
        for error in dataset.errors:
            skipped(error)
        if random_init:
            trunk = random_model(model, seed)
        elif model in LAPTOP_ARCHITECTURES:
            raise fail(
                f"{model} is an architecture without released weights: pass a `mlx-aim train` "
                "output directory, or add --random-init for a random baseline"
            )
        else:
            head_name = layers if layers in ("last", "best") else None
            released_v1 = model in mlx_aim.REGISTRY and mlx_aim.REGISTRY[model].checkpoint
            trunk = mlx_aim.load(model, head=head_name if eval_only and released_v1 else None)

        with progress_bars() as bar:
            hooks = Hooks(
                log=lambda line: err_console.print(line, highlight=False),
                on_error=skipped,
                progress=bar,
            )
            if eval_only:
                items = dataset.val or dataset.train
                result = evaluate_classifier(
                    trunk,
                    items,
                    classes=dataset.classes,
                    model_classes=read_classes(model) if Path(model).is_dir() else None,
                    batch_size=batch_size,
                    num_workers=workers,
                    hooks=hooks,
                )
            else:
                result = train_probe(trunk, dataset, config, model_name=model, hooks=hooks)

    if eval_only:
        split = "val" if dataset.val else "all"
        typer.echo(
            f"{model} on {data_dir} ({split}, {result['count']} images): "
            f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%"
        )
        if output is not None:
            with _bad_input():
                files = save_evaluation(result, output, model=model, data=str(data_dir))
            typer.echo(f"wrote {' and '.join(str(f) for f in files)}")
        return

    with _bad_input():
        save_probe(result, output, overwrite=force)
    final = result.report["final"]
    summary = f"{head} probe on {model}: {result.report['num_train']} train images"
    if final.get("top1") is not None:
        summary += f", val top-1 {100 * final['top1']:.2f}% top-5 {100 * final['top5']:.2f}%"
    typer.echo(summary)
    typer.echo(f"wrote {output} (mlx_aim.load it for the classifier)")


def register(app: typer.Typer) -> None:
    """Add ``mlx-aim probe`` to ``app``."""
    app.command("probe", epilog=EXIT_CODES_HELP)(probe_command)
