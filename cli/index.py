"""``mlx-aim index``: embed photo folders into an incremental, crash-safe SQLite index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from mlx_aim.errors import InputError
from mlx_aim.io import check_destination
from mlx_aim.messages import plural
from mlx_aim.tasks.config import PATHS_HELP

from .embed import end_partial, image_sources, skip_reporter
from .errors import IMAGE_COMMAND_EXITS, err_console, prepare_cpu_backend, reported_errors
from .progress import progress_bars, working

if TYPE_CHECKING:
    from mlx_aim.index import Index

VECTOR_TYPES = ("float16", "float32")


def register(app: typer.Typer) -> None:
    """Add ``mlx-aim index`` to ``app``."""
    app.command("index", epilog=IMAGE_COMMAND_EXITS)(index_command)


def index_model(model: str | None, db: Path | None) -> str | None:
    """The model to open an index with: ``--model``; else the one an existing ``--db`` records
    (None); else the LiT model, whose text tower makes text queries possible."""
    from mlx_aim.checkpoints.registry import LIT_NAME

    if model is not None:
        return model
    return None if db is not None and db.expanduser().is_file() else LIT_NAME


def _check(batch_size: int, workers: int, vectors: str) -> None:
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, not {batch_size}")
    if workers < 0:
        raise InputError(f"--workers must be >= 0, not {workers}")
    if vectors not in VECTOR_TYPES:
        raise InputError(f"--vectors must be float16 or float32, not {vectors!r}")


def _load_model(index: Index) -> None:
    """Load the index's model, checked against the database; a database this call created is
    removed again when the model cannot be loaded (no empty index is left behind)."""
    from mlx_aim.index.store import Store

    created = not index.db.exists()
    try:
        store = Store(index.db, create=True)
        try:
            index.encoder(store)
        finally:
            store.close()
    except BaseException:
        if created:
            for end in ("", "-wal", "-shm"):
                index.db.with_name(index.db.name + end).unlink(missing_ok=True)
        raise


def index_command(
    paths: list[str] = typer.Argument(
        ...,
        help=PATHS_HELP,
        show_default=False,
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="A registry name or an mlx-aim model folder. Default: the model an existing --db "
        "was built with, else aimv2-large-patch14-224-lit (text and image queries).",
        show_default=False,
    ),
    db: Path | None = typer.Option(
        None,
        "--db",
        help="The index database. Default: one per model in $MLX_AIM_CACHE/index "
        "(~/.cache/mlx-aim/index).",
        show_default=False,
    ),
    pool: str = typer.Option("auto", "--pool", help="Pooling (as in embed; not tokens)."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per forward pass."),
    workers: int = typer.Option(2, "--workers", help="Image decoding threads (0: none)."),
    vectors: str = typer.Option(
        "float16", "--vectors", help="How a new index stores vectors: float16 or float32."
    ),
    wait: bool = typer.Option(
        False, "--wait", help="Wait for another index run on the same --db instead of exit 3."
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print one JSON summary: added, updated, removed, unchanged, moved, failed, total.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Index images for search: new and changed files are embedded, moved files keep their
    vector, deleted files are dropped. Safe to interrupt (even kill -9) and run again.

    Examples:

      mlx-aim index ~/Pictures

      mlx-aim index photos/ scans/*.png --json

      mlx-aim index photos/ --model runs/my-lit --db photos.sqlite

    Unreadable files are named on stderr and skipped (exit code 4); they are tried again on the
    next run. A second index run on the same database exits 3 naming the first (or --wait).
    """
    from mlx_aim.index import Index
    from mlx_aim.index.store import Store, WriterLock

    skipped, report = skip_reporter()
    with reported_errors():
        _check(batch_size, workers, vectors)
        sources = image_sources(paths)
        chosen = index_model(model, db)
        index = Index(
            db, model=chosen, pool=pool, batch_size=batch_size, workers=workers, vectors=vectors
        )
        # a folder, under a file, inside the model: named before any work, nothing written
        check_destination(index.db, overwrite=True, reads=[chosen] if chosen else [])
        if index.db.is_file():
            Store(index.db).close()  # not a database: said before a .lock is made beside it
        lock = WriterLock(index.db).acquire(wait=wait)  # a busy index: say so before loading
        try:
            prepare_cpu_backend()
            with working(f"loading {chosen or 'the model'}", enabled=not quiet):
                _load_model(index)
        finally:
            lock.release()
        with progress_bars(enabled=not quiet) as bar:
            summary = index.add(sources, on_error=report, progress=bar, wait=wait)
    if as_json:
        typer.echo(json.dumps({**summary.to_dict(), "db": str(index.db)}))
    elif not quiet:
        counts = ", ".join(
            f"{getattr(summary, k)} {k}" for k in ("added", "updated", "removed", "unchanged")
        )
        moved = f", {summary.moved} moved" if summary.moved else ""
        err_console.print(
            f"{counts}{moved}: {plural(summary.total, 'image')} in {index.db}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    end_partial(skipped, quiet)
