"""The training loop: steps, logging, validation, previews, probes and checkpoints.

:class:`TrainLoop` takes what it loops over as arguments (as mlx-lm's ``tuner/trainer.py`` does);
``run.py`` builds them from the settings and the objective's plan (``plans.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..errors import InputError, MlxAimError, NonFiniteError
from ..random_key import random_key
from .checkpoint import STATE_FILE
from .distributed import agree, gather_ints

if TYPE_CHECKING:  # the loop only uses what run.py built
    from ..data.loader import ImageLoader
    from .checkpoint import CheckpointStore
    from .config import TrainConfig
    from .distributed import World
    from .evaluation import Previews, Validation
    from .inputs import SkippedFiles
    from .multimodal import CaptionValidation
    from .report import MetricsLog, Reporter
    from .stopping import StopSignals
    from .tracking import DownstreamProbe


class TrainLoop:
    """The training loop proper, with its logging, validation, previews and checkpoints.

    It takes everything it loops over as arguments (``run.py`` assembles them): the model and
    optimizer, the compiled ``train_step``, the ``loader`` and ``inputs`` (one loader batch -> one
    micro-batch input of the step), the evaluators, and where it reports and checkpoints; ``config``
    gives the schedule (steps, accumulation, intervals).
    """

    def __init__(
        self,
        config: TrainConfig,
        world: World,
        model: nn.Module,
        optimizer,
        train_step: Callable[[list[Any]], tuple[mx.array, ...]],
        loader: ImageLoader,
        step: int,
        *,
        inputs: Callable[[dict[str, Any]], Any],
        validation: Validation | CaptionValidation,
        previews: Previews | None,
        probe: DownstreamProbe | None = None,
        reporter: Reporter,
        metrics: MetricsLog,
        store: CheckpointStore,
        documents: dict[str, Any],
        skipped: SkippedFiles,
    ):
        self.config, self.world = config, world
        self.model, self.optimizer = model, optimizer
        self.train_step, self.loader, self.inputs = train_step, loader, inputs
        self.validation, self.previews, self.probe = validation, previews, probe
        self.reporter, self.metrics, self.store = reporter, metrics, store
        self.documents, self.skipped = documents, skipped
        self.step = step
        self.last_checkpoint = step if step else None
        self.last_val, self.last_val_step = None, None
        self.last_preview_step = self.last_probe_step = None
        self.initial_loss = self.initial_val_loss = self.final_loss = None
        self.window: list[float] = []  # train losses since the last logging step
        self.parts_window: list[list[float]] = []  # aimv2: [image, text] losses, same steps
        self.images_per_second: float | None = None
        self.stopped_by: int | None = None  # the signal that stopped the loop

    def run(self, stop: StopSignals) -> None:
        """Train until ``--steps`` or a stop signal (then ``stopped_by`` is set)."""
        config = self.config
        batches = iter(self.loader)
        timed_steps, timed_seconds, first = 0, 0.0, True
        try:
            while self.step < config.steps:
                if stop.requested is not None:
                    self.stopped_by = stop.requested
                    break
                t0 = time.perf_counter()
                loss, norm, *parts = self.train_step(self._next_batches(batches))
                loss, norm = loss.item(), norm.item()
                self.parts_window.extend(p.tolist() for p in parts)
                self.step += 1
                if not first:  # the first step after a start compiles
                    timed_steps += 1
                    timed_seconds += time.perf_counter() - t0
                first = False
                self._check_finite(loss, norm)
                self._after_step(loss, norm, timed_steps, timed_seconds)
        finally:
            batches.close()

    def _next_batches(self, batches: Iterator[dict]) -> list:
        """The ``--grad-accum`` micro-batch inputs of one step."""
        out = []
        for _ in range(self.config.grad_accum):
            try:
                batch = next(batches)
            except ValueError as e:  # no readable image in a whole epoch
                raise InputError(f"--data: {e}") from None
            out.append(self.inputs(batch))
        return out

    def _check_finite(self, loss: float, norm: float) -> None:
        if not (math.isfinite(loss) and math.isfinite(norm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise NonFiniteError(
                f"non-finite {what} at step {self.step} (loss {loss}, gradient norm {norm}); "
                f"the learning rate (--lr {self.config.lr:g}) is probably too high",
                self.step,
            )

    def _after_step(self, loss: float, norm: float, timed_steps: int, timed_seconds: float):
        """Log, validate, preview and checkpoint at their intervals."""
        config, step = self.config, self.step
        if self.initial_loss is None and step == 1:
            self.initial_loss = loss
        self.window.append(loss)
        self.reporter.advance(step, loss)
        if step % config.log_every == 0 or step == config.steps:
            self._log(norm, timed_steps, timed_seconds)
            self.window, self.parts_window = [], []
        if config.val_every and step % config.val_every == 0:
            self.validate()
        if self.previews is not None and step % config.preview_every == 0:
            self.preview()
        if self.probe is not None and config.probe_every and step % config.probe_every == 0:
            self.probe_trunk()
        if step % config.checkpoint_every == 0:
            self.checkpoint()

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the logging window and the losses of a checkpointed run."""
        self.window = list(state.get("window", []))
        self.parts_window = list(state.get("parts_window", []))
        self.initial_loss = state.get("initial_loss")
        self.initial_val_loss = state.get("initial_val_loss")
        self.final_loss = state.get("final_loss")
        self.last_val, self.last_val_step = state.get("last_val") or (None, None)

    def evaluate_start(self) -> None:
        """The validation loss and the probe of the initial (untrained) model."""
        if self.validation.enabled:
            self.validate()
        if self.probe is not None:
            self.probe_trunk()

    def validate(self) -> None:
        """The validation loss of the current step, recorded on rank 0."""
        loss = self.validation.evaluate(self.model)
        if loss is None:
            return
        if self.step == 0:
            self.initial_val_loss = loss
        self.last_val, self.last_val_step = loss, self.step
        if self.world.is_main:
            parts = self.validation.parts
            self.metrics.append({"split": "val", "step": self.step, "loss": loss, **parts})
            detail = ", ".join(f"{k.removesuffix('_loss')} {v:.4f}" for k, v in parts.items())
            self.reporter.log(
                f"step {self.step} validation loss {loss:.4f}" + (f" ({detail})" if detail else "")
            )

    def probe_trunk(self) -> None:
        """Probe the trunk of the current step on ``--probe-data`` and record its top-1 (rank 0)."""
        result = self.probe.evaluate(self.model)
        self.last_probe_step = self.step
        self.metrics.append({"split": "probe", "step": self.step, **result})
        self.reporter.log(f"step {self.step} probe top-1 {100 * result['top1']:.2f}%")

    def preview(self) -> None:
        self.previews.write(self.model, self.step)
        self.last_preview_step = self.step

    def _log(self, norm: float, timed_steps: int, timed_seconds: float) -> None:
        config = self.config
        self.final_loss = sum(self.window) / len(self.window)
        seconds_per_step = timed_seconds / timed_steps if timed_steps else None
        if seconds_per_step:
            self.images_per_second = config.batch_size * config.grad_accum / seconds_per_step
        record = {
            "split": "train",
            "step": self.step,
            "loss": self.final_loss,
            "grad_norm": norm,
            "lr": self.optimizer.learning_rate.item(),
            "images_per_s": self.images_per_second or 0.0,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "eta_s": (config.steps - self.step) * (seconds_per_step or 0.0),
            "skipped_files": len(self.skipped.paths),
            "time": time.time(),
        }
        if self.parts_window:
            image, text = np.mean(self.parts_window, axis=0).tolist()
            record.update(image_loss=image, text_loss=text)
        if self.world.is_main:
            self.metrics.append(record)
            self.reporter.step(self.step, {**record, "val_loss": self.last_val})

    def checkpoint(self) -> None:
        """Write the checkpoint of the current step (rank 0), with every rank's data position."""
        position = self.loader.state()
        loaders = gather_ints([position["epoch"], position["cursor"]], self.world)
        error = None
        if self.world.is_main:
            state = {
                **self.documents[STATE_FILE],
                "random_state": random_key(),
                "loaders": loaders,
                "skipped_files": sorted(self.skipped.paths),
                "loop": {
                    "window": self.window,
                    "parts_window": self.parts_window,
                    "initial_loss": self.initial_loss,
                    "initial_val_loss": self.initial_val_loss,
                    "final_loss": self.final_loss,
                    "last_val": [self.last_val, self.last_val_step],
                },
                "time": time.time(),
            }
            arrays = {
                "model.safetensors": dict(tree_flatten(self.model.parameters())),
                "optimizer.safetensors": dict(tree_flatten(self.optimizer.state)),
            }
            try:
                path = self.store.save(self.step, arrays, {**self.documents, STATE_FILE: state})
                self.reporter.log(f"step {self.step} checkpoint {path}")
            except MlxAimError as e:
                error = e
        agree(error, self.world)
        self.last_checkpoint = self.step


def run_loop(loop: TrainLoop, stop: StopSignals, store: CheckpointStore) -> None:
    """Run the loop; a non-finite loss names the last good checkpoint to resume from."""
    try:
        loop.run(stop)
    except NonFiniteError as e:
        last = store.newest_intact()
        if last is not None:
            step = int(last.name.removeprefix("step-"))
            where = f"{last} (step {step}); run again with a lower --lr to resume from it"
        else:
            where = "none (no checkpoint was written); run again with a lower --lr"
        raise NonFiniteError(f"{e}; last good checkpoint: {where}", e.step) from None


__all__ = ["TrainLoop", "run_loop"]
