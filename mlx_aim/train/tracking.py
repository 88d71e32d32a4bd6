"""Downstream tracking during a run: a quick probe of the current trunk (``--probe-data``).

The paper's first claim is that the pre-training loss tracks downstream quality. To watch it
happen, a run can train a linear probe on the frozen trunk of the current step every
``--probe-every`` steps (``mlx_aim.tasks.probe.train_probe``, with the fixed ``PROBE_SETTINGS``) and log
its top-1 next to the validation loss. Nothing is cached across steps (the trunk changes), and
the probe neither changes the model nor draws from the run's random state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..data.builtin import resolve_builtin
from ..data.images import ImageError
from ..data.transforms import Preprocessing
from ..errors import InputError
from ..tasks.probe import Hooks, ProbeConfig, check_classes, load_dataset, train_probe
from .resume import set_random_key

# Fixed probe settings (the same for every run and every step, so their top-1s compare).
# Linear (BatchNorm + linear on the token mean): a few seconds on small data, and further from its
# ceiling than the attentive probe on easy data (digits: ~75 % vs ~86 % on a random trunk).
PROBE_SETTINGS = ProbeConfig(head="linear", epochs=10, seed=0, cache=False)


class DownstreamProbe:
    """Probes a pre-training model's trunk on one labelled dataset (rank 0); ``root`` may name a
    built-in one (``digits``, ``scenes/count``: ``resolve_builtin``).

    ``evaluate(model)`` returns the probe's record: top-1, top-5 and its last training loss.
    """

    def __init__(
        self,
        root: str,
        preprocessing: Preprocessing,
        *,
        workers: int,
        on_error: Callable[[ImageError], None],
    ):
        self.settings = dataclasses.replace(PROBE_SETTINGS, workers=workers)
        root = str(resolve_builtin(root))
        try:
            self.data = load_dataset(root, self.settings.val_fraction, self.settings.seed)
            check_classes(self.data)
        except InputError as e:
            raise InputError(f"--probe-data {e}") from None
        self.preprocessing = preprocessing
        self.on_error = on_error
        self.reported: set[str] = set()  # unreadable files are reported once per run
        for problem in self.data.errors:
            self._skip(problem)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Train the probe on ``model``'s frozen trunk now; ``{"top1", "top5", "loss"}``."""
        random_key = np.array(mx.random.state[0]).tolist()
        training = model.training
        model.preprocessing = self.preprocessing
        try:
            result = train_probe(model, self.data, self.settings, hooks=Hooks(on_error=self._skip))
        finally:
            set_random_key(random_key)
            model.train(training)
        return dict(result.report["final"])

    def _skip(self, error: ImageError) -> None:
        if str(error) not in self.reported:
            self.reported.add(str(error))
            self.on_error(error)
