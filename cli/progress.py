"""Progress on stderr for long commands (shown only on a terminal), and counted nouns."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .errors import err_console


def _progress(enabled: bool, *columns) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *columns,
        console=err_console,
        transient=True,
        disable=not (enabled and err_console.is_terminal),
    )


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yield ``bar(description, total) -> advance(n)``; a finished bar disappears."""
    progress = _progress(enabled, MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())

    def bar(description: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(description, total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)
            if progress.tasks[progress.task_ids.index(task)].finished:
                progress.remove_task(task)

        return advance

    with progress:
        yield bar


@contextmanager
def working(description: str, enabled: bool = True) -> Iterator[None]:
    """A pulsing bar with the elapsed time for a step whose length is unknown; gone when done."""
    progress = _progress(enabled, TimeElapsedColumn())
    progress.add_task(description, total=None)
    with progress:
        yield
