"""Stopping a run cleanly on Ctrl-C (SIGINT), SIGTERM or SIGHUP.

The first signal asks the loop to stop after the current step; the run then writes a checkpoint
and the trunk and ends with :class:`~mlx_aim.errors.Interrupted` (exit code 128 + the signal).
A second signal stops at once (the checkpoints on disk stay intact: they are written atomically).
Before the loop starts (``at_once``: reading the data, training a tokenizer) there is nothing to
save, so the first signal stops at once.
"""

from __future__ import annotations

import signal
import threading

from ..errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """Catch the stop signals while the run lasts (main thread only); ``requested`` is the first."""

    def __init__(self, enabled: bool = True, at_once: bool = False):
        self.requested: int | None = None
        self.at_once = at_once  # raise Interrupted on the first signal (set False once training)
        self._previous: dict[int, object] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: object = None) -> None:
        """Record the first stop signal; raise ``Interrupted`` on a second one (or ``at_once``)."""
        name = signal.Signals(signum).name
        if self.at_once:
            raise Interrupted(f"stopped by {name} before training began", signum)
        if self.requested is not None:
            raise Interrupted(f"stopped at once by a second {name}", signum)
        self.requested = signum

    def restore(self) -> None:
        """Put the previous handlers back."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
