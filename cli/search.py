"""``mlx-aim search``: find images in an index by text, by example images, or find duplicates."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
import typer
from typer.core import TyperCommand

from mlx_aim.errors import ExitCode, InputError, OutputError, exit_codes_help
from mlx_aim.io import check_destination, check_not_reading
from mlx_aim.messages import plural

from .errors import err_console, prepare_cpu_backend, reported_errors
from .index import index_model
from .progress import working

if TYPE_CHECKING:
    from mlx_aim.index import Hit, Index, Pair


class QueryCommand(TyperCommand):
    """A command whose arguments may be negative query terms: ``-people`` is passed on as the
    two words ``-`` ``people`` unless it is one of the command's options (``-k``, ``-q``...),
    a short option with a number attached (``-k5``) or the value of an option (``-k -1``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        known = {name for param in self.params for name in getattr(param, "opts", ())}
        valued = {
            name
            for param in self.params
            if getattr(param, "is_flag", True) is False and not param.count  # options only
            for name in param.opts
        }
        out: list[str] = []
        for i, arg in enumerate(args):
            if arg == "--":
                out.extend(args[i:])
                break
            option = arg.split("=", 1)[0]
            if i and args[i - 1] in valued:  # the value of -k / --threshold: -1, -0.5
                out.append(arg)
                continue
            if arg.startswith("-") and not arg.startswith("--") and len(arg) > 1:
                attached = arg[:2] in known and arg[2:].isdigit()  # -k5
                if option not in known and not attached:
                    out.extend(["-", arg[1:]])
                    continue
            out.append(arg)
        return super().parse_args(ctx, out)


SEARCH_EXITS = exit_codes_help(
    ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.USAGE, ExitCode.OUTPUT, ExitCode.INTERRUPTED
)


def register(app: typer.Typer) -> None:
    """Add ``mlx-aim search`` to ``app``."""
    app.command("search", epilog=SEARCH_EXITS, cls=QueryCommand)(search_command)


def _results(index: Index, query: list[str], k: int, within: Path | None, quiet: bool) -> list[Hit]:
    with working("searching", enabled=not quiet):
        return index.search(query, k, within=within)


def _print_hits(hits: list[Hit], as_json: bool) -> None:
    for hit in hits:
        if as_json:
            typer.echo(json.dumps({"path": hit.path, "score": round(hit.score, 6)}))
        else:
            typer.echo(hit.path)


def _print_pairs(pairs: list[Pair], as_json: bool) -> None:
    for pair in pairs:
        if as_json:
            typer.echo(
                json.dumps({"paths": [pair.a, pair.b], "similarity": round(pair.similarity, 6)})
            )
        else:
            typer.echo(f"{pair.similarity:.4f}\t{pair.a}\t{pair.b}")


def _sheet(html: Path, title: str, items: list[tuple[str, str]], quiet: bool) -> None:
    from mlx_aim.index.sheet import write_contact_sheet

    with working(f"writing {html}", enabled=not quiet):
        write_contact_sheet(html, title, items)
    if not quiet:
        err_console.print(f"wrote {html}", highlight=False, soft_wrap=True, markup=False)


def _check_sheet(
    html: Path, index: Index, query: list[str], model: str | None, force: bool
) -> None:
    """Refuse an --html page that would replace a file without --force, or any file the search
    reads: the database and the files beside it, the model, a query image, an indexed image."""
    from mlx_aim.index.store import Store

    db = index.db
    # the files beside the database may not exist yet (check_destination skips absent reads)
    beside = [db.with_name(db.name + end) for end in ("-wal", "-shm", ".vectors", ".lock")]
    target = Path(os.path.abspath(html.expanduser())).resolve()
    if any(target == Path(os.path.abspath(f)).resolve() for f in beside):
        raise OutputError(f"{html}: refusing to write over a file of the index {db}")
    images = [w for word in query if os.path.isfile(w := word.lstrip("+-"))]
    check_destination(html, overwrite=force, reads=[db, *images, *([model] * bool(model))])
    store = Store(db)
    try:
        indexed = store.holds(os.fsencode(os.path.abspath(html.expanduser())))
    finally:
        store.close()
    if indexed:
        raise OutputError(f"{html}: refusing to write over an indexed image; write it elsewhere")


def search_command(
    query: list[str] | None = typer.Argument(
        None,
        help="Texts and image paths; +/- signs and N: weights combine them, e.g. "
        "\"beach\" +./sunset.jpg -people or '2:golden retriever'.",
        show_default=False,
    ),
    db: Path | None = typer.Option(
        None,
        "--db",
        help="The index database (default: the model's in $MLX_AIM_CACHE/index).",
        show_default=False,
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="The model that embeds the query (default: the one the index was built with).",
        show_default=False,
    ),
    k: int = typer.Option(10, "-k", "--top", help="How many results."),
    within: Path | None = typer.Option(
        None, "--dir", help="Only results inside this folder.", show_default=False
    ),
    duplicates: bool = typer.Option(
        False, "--duplicates", help="List pairs of near-identical images instead of searching."
    ),
    threshold: float = typer.Option(
        0.95, "--threshold", help="--duplicates: the cosine similarity from which images match."
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="One JSON object a line: {path, score}; with --duplicates {paths, similarity}.",
    ),
    html: Path | None = typer.Option(
        None,
        "--html",
        help="Also write an HTML contact sheet (thumbnails and scores).",
        show_default=False,
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --html file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or messages."),
) -> None:
    """Search an index made by mlx-aim index: best matches first, one path a line.

    Examples:

      mlx-aim search "a red boat at sunset"

      mlx-aim search beach +./sunset.jpg -people -k 20 | xargs open

      mlx-aim search --dir ~/Pictures/2024 --json -- '2:golden retriever' -grass

      mlx-aim search photo.jpg --html similar.html

      mlx-aim search --duplicates --threshold 0.97

    Text queries need a LiT model (the default index model, or a LiT run); images work with any.
    A word starting with - is a negative term unless it is an option (-k, -m, -q); -- before the
    terms makes every word a term.
    """
    from mlx_aim.index import Index

    with reported_errors():
        if k < 1:
            raise InputError(f"-k must be >= 1, not {k}")
        if duplicates == bool(query):
            raise InputError("give a query, or --duplicates (not both)")
        within = within.expanduser() if within is not None else None
        if within is not None and not within.is_dir():
            raise InputError(f"--dir {within}: no such folder")
        chosen = index_model(model, db) if db is None else model
        index = Index(db, model=chosen, batch_size=1)  # a query is one image or text
        if not index.db.is_file() or (db is None and _empty(index.db)):  # empty: a failed first run
            raise InputError(_no_index(index.db, searched_default=db is None and model is None))
        if html is not None:
            _check_sheet(html, index, query or [], chosen, force)
        if duplicates:
            _duplicates(index, threshold, within, as_json, html, quiet)
            return
        prepare_cpu_backend()
        hits = _results(index, query, k, within, quiet)
        _print_hits(hits, as_json)
        if html is not None:
            check_not_reading(html, [h.path for h in hits])
            title = "search: " + " ".join(query)
            _sheet(html, title, [(h.path, f"{h.score:.3f}") for h in hits], quiet)


def _empty(db: Path) -> bool:
    """Whether the index at ``db`` holds no model yet (nothing was ever added)."""
    from mlx_aim.index.store import Store

    store = Store(db)
    try:
        return store.identity is None
    finally:
        store.close()


def _no_index(path: Path, searched_default: bool) -> str:
    """The error for a missing index, naming the other indexes beside it when the default one
    (that of the released LiT model) was looked for: an index of another model needs --db."""
    message = f"{path}: no index here; build one with mlx-aim index first"
    others = (
        [o for o in sorted(path.parent.glob("*.sqlite")) if o != path] if searched_default else []
    )
    if others:
        names = ", ".join(str(other) for other in others[:5])
        message += f", or name one of the indexes of other models with --db: {names}"
    return message


def _duplicates(
    index: Index,
    threshold: float,
    within: Path | None,
    as_json: bool,
    html: Path | None,
    quiet: bool,
) -> None:
    with working("comparing every pair", enabled=not quiet):
        pairs = index.duplicates(threshold, within=within)
    _print_pairs(pairs, as_json)
    if not quiet:
        err_console.print(
            f"{plural(len(pairs), 'pair')} at or above {threshold:g}", highlight=False
        )
    if html is not None:
        check_not_reading(html, [p for pair in pairs for p in (pair.a, pair.b)])
        items = [(p, f"{pair.similarity:.3f}") for pair in pairs for p in (pair.a, pair.b)]
        _sheet(html, f"near-duplicates (cosine >= {threshold:g})", items, quiet)
