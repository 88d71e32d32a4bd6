"""``mlx-aim probe``: train an attentive (or linear) probe on a frozen trunk, or evaluate one.

The settings flags (--epochs, --lr, ...) are generated from ``ProbeConfig``'s fields
(``cli/options.py``); the trunk, data and output flags are declared here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mlx_aim.errors import EXIT_CODES_HELP, ExitCode, InputError, OutputError
from mlx_aim.io import check_destination
from mlx_aim.messages import plural
from mlx_aim.tasks.probe.config import Hooks, ProbeConfig

from .errors import err_console, prepare_cpu_backend, reported_errors, warn
from .options import with_config_options
from .progress import progress_bars

if TYPE_CHECKING:
    import mlx.nn

_SHORT = {"epochs": "-e", "batch_size": "-b"}


def default_output(model: str, head: str, random_init: bool) -> Path:
    """``runs/<model>-probe``; ``-linear-probe`` for the linear head, ``-random`` for a random trunk."""
    source = Path(model.rstrip("/"))
    name = source.stem if source.is_file() else source.name
    kind = "probe" if head == "attentive" else f"{head}-probe"
    return Path("runs") / f"{name}-{kind}{'-random' if random_init else ''}"


def probe_command(
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="Trunk: a registry name, an mlx-aim model directory (convert or train output) or a "
        "checkpoint file.",
        rich_help_panel="Model",
    ),
    random_init: bool = typer.Option(
        False,
        "--random-init",
        help="Probe a randomly initialised trunk of the model's architecture (a baseline).",
        rich_help_panel="Model",
    ),
    eval_only: bool = typer.Option(
        False,
        "--eval-only",
        help="Evaluate a model that already has a classifier head, on val/ when the data has "
        "one, else on every image.",
        rich_help_panel="Model",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        "-d",
        help="Image folder: <class>/<images>, or train/<class>/ and val/<class>/. "
        "Default: the built-in digits.",
        rich_help_panel="Data",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Directory for the classifier, classes.json and probe_report.json (default: "
        "runs/<model>-probe, runs/<model>-probe-random with --random-init); with --eval-only, "
        "the folder for eval_report.json and predictions.jsonl (nothing is written without -o).",
        rich_help_panel="Output",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace existing outputs.", rich_help_panel="Output"
    ),
    quiet: bool = typer.Option(
        False,
        "--quiet",
        "-q",
        help="No progress bars or per-epoch lines: warnings, errors and the summary only.",
        rich_help_panel="Output",
    ),
    **settings: Any,
) -> None:
    """Train an attentive probe on a frozen trunk, or evaluate a classifier (--eval-only).

    Reports top-1 / top-5 on the validation split every epoch and writes OUTPUT, a model directory that mlx_aim.load() returns as the full classifier (trunk + head), with classes.json and probe_report.json. Without --augment the trunk's features are computed once and cached, so more epochs and reruns only cost the head.

    [bold]Examples[/bold]

      mlx-aim probe --model runs/aim-nano   [dim](the built-in digits; writes runs/aim-nano-probe)[/dim]

      mlx-aim probe --model aim-nano --random-init   [dim](a random trunk as baseline)[/dim]

      mlx-aim probe --data ~/flowers --model aimv2-large-patch14-224 --epochs 30 -o probes/flowers

      mlx-aim probe --data ~/imagenet --model aim-600M --layers best --eval-only
    """
    from mlx_aim.data.builtin import builtin_dataset

    prepare_cpu_backend()
    with reported_errors():
        config = ProbeConfig(**settings).validate()
        data_dir = data if data is not None else builtin_dataset("digits")
        if eval_only:
            if random_init:
                raise InputError("--eval-only and --random-init exclude each other")
            _evaluate(model, data_dir, output, config, force=force, quiet=quiet)
        else:
            output = output or default_output(model, config.head, random_init)
            _train(
                model, data_dir, output, config, random_init=random_init, force=force, quiet=quiet
            )


def _check_cache(config: ProbeConfig) -> None:
    """Refuse an unwritable feature cache before any work (``--no-cache`` avoids it)."""
    from mlx_aim.tasks.features import FeatureCache

    if config.cache:
        try:
            check_destination(FeatureCache(config.cache_dir).root, overwrite=True, directory=True)
        except OutputError as e:
            raise OutputError(f"{e} (choose another --cache-dir, or --no-cache)") from None


def _load_trunk(
    model: str, *, random_init: bool, seed: int, head: str | None = None
) -> mlx.nn.Module:
    """The trunk to probe: random (--random-init), or what mlx_aim.load returns (``head``: a
    released AIMv1 classifier head to attach)."""
    import mlx_aim
    from mlx_aim.checkpoints.registry import LAPTOP_ARCHITECTURES
    from mlx_aim.tasks.probe import random_model

    if random_init:
        return random_model(model, seed)
    if model in LAPTOP_ARCHITECTURES:
        raise InputError(
            f"{model} is an architecture without released weights: pass a `mlx-aim train` "
            "output directory, or add --random-init for a random baseline"
        )
    return mlx_aim.load(model, head=head)


def _hooks(bar: Callable[[str, int], Callable[[int], None]], quiet: bool) -> Hooks:
    def log(line: str) -> None:
        if not quiet:
            err_console.print(line, highlight=False, soft_wrap=True, markup=False)

    return Hooks(log=log, on_error=lambda error: warn(f"skipped {error}"), progress=bar)


def _train(
    model: str,
    data_dir: Path,
    output: Path,
    config: ProbeConfig,
    *,
    random_init: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Check the destinations, train the probe, write OUTPUT and print the summary."""
    from mlx_aim.tasks.probe import check_classes, load_dataset, save_probe, train_probe

    check_destination(output, overwrite=force, directory=True)
    _check_cache(config)
    dataset = load_dataset(data_dir, config.val_fraction, config.seed)
    check_classes(dataset)
    for error in dataset.errors:
        warn(f"skipped {error}")
    trunk = _load_trunk(model, random_init=random_init, seed=config.seed)
    with progress_bars(enabled=not quiet) as bar:
        result = train_probe(
            trunk,
            dataset,
            config,
            model_name=model,
            random_init=random_init,
            hooks=_hooks(bar, quiet),
        )
    save_probe(result, output, overwrite=force)
    report, final = result.report, result.report["final"]
    trunk_kind = " (random initialisation)" if random_init else ""
    summary = (
        f"{config.head} probe on {model}{trunk_kind}: {plural(report['num_train'], 'train image')}"
    )
    if final.get("top1") is not None:
        summary += f", val top-1 {100 * final['top1']:.2f}% top-5 {100 * final['top5']:.2f}%"
    typer.echo(summary)
    typer.echo(f"wrote {output} (mlx_aim.load it for the classifier)")
    _exit_if_skipped(len(report["unreadable"]))


def _evaluate(
    model: str,
    data_dir: Path,
    output: Path | None,
    config: ProbeConfig,
    *,
    force: bool,
    quiet: bool,
) -> None:
    """Score a classifier on ``data_dir`` (val/ when it has one); write the results with -o."""
    import mlx_aim
    from mlx_aim.tasks.probe import (
        eval_files,
        evaluate_classifier,
        load_dataset,
        read_classes,
        save_evaluation,
    )

    for file in eval_files(output) if output is not None else []:
        check_destination(file, overwrite=force)
    dataset = load_dataset(data_dir, 0.0, config.seed)  # val/ when there is one, else every image
    for error in dataset.errors:
        warn(f"skipped {error}")
    released_v1 = model in mlx_aim.REGISTRY and mlx_aim.REGISTRY[model].checkpoint
    released_head = config.layers if released_v1 and config.layers in ("last", "best") else None
    trunk = _load_trunk(model, random_init=False, seed=config.seed, head=released_head)
    with progress_bars(enabled=not quiet) as bar:
        result = evaluate_classifier(
            trunk,
            dataset.val or dataset.train,
            classes=dataset.classes,
            model_classes=read_classes(model) if Path(model).is_dir() else None,
            batch_size=config.forward_batch_size,
            num_workers=config.workers,
            hooks=_hooks(bar, quiet),
        )
    split = "val" if dataset.val else "all"
    typer.echo(
        f"{model} on {data_dir} ({split}, {plural(result['count'], 'image')}): "
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%"
    )
    if output is not None:
        files = save_evaluation(result, output, model=model, data=str(data_dir), overwrite=force)
        typer.echo(f"wrote {' and '.join(str(f) for f in files)}")
    _exit_if_skipped(len(dataset.errors) + len(result["unreadable"]))


def _exit_if_skipped(unreadable: int) -> None:
    """Exit code 4 (partial) when unreadable images were left out (each was named above)."""
    if unreadable:
        warn(f"{plural(unreadable, 'unreadable image')} left out (named above)")
        raise typer.Exit(int(ExitCode.PARTIAL))


with_config_options(probe_command, ProbeConfig, _SHORT)


def register(app: typer.Typer) -> None:
    """Add ``mlx-aim probe`` to ``app``."""
    app.command("probe", epilog=EXIT_CODES_HELP)(probe_command)
