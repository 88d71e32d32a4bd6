"""``train(config)``: one AIM pre-training run from images to an exported trunk.

Order of a run: check the settings; join the distributed group (when launched by ``mlx.launch``);
resolve the model and find the images; check and lock the output directory (rank 0); build the
model and optimizer, or restore them from the newest good checkpoint in the output directory;
train, logging, validating, previewing and checkpointing at their intervals; finally export the
trunk at the root of the output directory (``config.json``, ``model.safetensors``,
``preprocess.json``) and draw the loss curve.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..blas import blas_info
from ..caption_tokenizer import TOKENIZER_FILE
from ..data import ImageLoader
from ..images import ImageError
from ..models import build_model
from ..registry import Preprocessing
from ..transforms import Preprocess, TrainTransform
from ..weights import (
    CONFIG_FILE,
    INDEX_FILE,
    PREPROCESS_FILE,
    WEIGHTS_FILE,
    save_model,
    write_json,
)
from .checkpoint import (
    CHECKPOINTS,
    LOCK_FILE,
    Checkpoint,
    OutputLock,
    list_checkpoints,
    load_latest_checkpoint,
    preflight,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import World, agree, broadcast, broadcast_ints, gather_ints, init_world
from .errors import BadInputError, Interrupted, NonFiniteError, OutputError, TrainError
from .evaluation import PREVIEWS, Previews, Validation
from .inputs import find_training_images, fixed_subset, resolve_model
from .multimodal import CaptionValidation, prepare_captions
from .multimodal_step import make_multimodal_train_step
from .optim import build_optimizer, warmup_cosine
from .report import (
    LOG_FILE,
    METRICS_FILE,
    MetricsLog,
    Reporter,
    loss_curve_image,
    save_png,
)
from .step import make_train_step

RUN_FILE = "run.json"
LOSS_CURVE_FILE = "loss.png"
# Settings a resumed run must share with the run that wrote the checkpoint (data order, model,
# batch composition); the others (schedule, intervals, ...) may change, and the change is logged.
FIXED_ON_RESUME = (
    "data", "val_data", "val_fraction", "model", "head_blocks", "head_width", "batch_size",
    "grad_accum", "seed", "objective", "vocab_size", "tokenizer",
)  # fmt: skip
# What a run writes into its output directory (anything else there makes preflight refuse it).
OWN_FILES = frozenset(
    {RUN_FILE, LOSS_CURVE_FILE, PREVIEWS, CHECKPOINTS, LOCK_FILE, METRICS_FILE, LOG_FILE,
     CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, PREPROCESS_FILE, TOKENIZER_FILE, ".export.tmp"}
)  # fmt: skip


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    output: Path
    step: int
    resumed_from: int | None
    initial_loss: float | None
    final_loss: float | None
    initial_val_loss: float | None
    val_loss: float | None
    images_per_second: float
    peak_memory_gb: float
    elapsed_s: float
    skipped_files: list[str] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)  # the pre-training model


# ---- the run ------------------------------------------------------------------------------------


class _StopFlag:
    """Ctrl-C asks the loop to stop after the current step (a second Ctrl-C aborts at once)."""

    def __init__(self, enabled: bool):
        self.requested = False
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class _Run:
    """State shared by the phases of one run (see :func:`train`)."""

    def __init__(self, config: TrainConfig, world: World):
        self.config = config
        self.world = world
        self.output = config.output_dir
        self.reporter = Reporter(
            self.output, config.steps, enabled=world.is_main, quiet=config.quiet
        )
        self.metrics = MetricsLog(self.output)
        self.skipped: list[str] = []
        self.lock: OutputLock | None = None
        self.model_config: dict[str, Any] = {}

    def log(self, message: str) -> None:
        self.reporter.log(message)

    def on_image_error(self, error: ImageError) -> None:
        self.skipped.append(str(error.path))
        if self.world.is_main:
            self.reporter.log(f"skipping unreadable image {error}", always=True)
        else:
            print(f"[rank {self.world.rank}] skipping unreadable image {error}", flush=True)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a pre-training run; see the module docstring.

    Raises ``TrainError`` subclasses with one-line messages: ``BadInputError`` (exit code 1),
    ``NonFiniteError`` (2), ``OutputError`` (3), ``Interrupted`` (130).
    """
    config.validate()
    world = init_world()
    if config.batch_size % world.size:
        raise BadInputError(
            f"--batch-size {config.batch_size} must be a multiple of the {world.size} processes"
        )
    run = _Run(config, world)
    stop = _StopFlag(enabled=world.size == 1)
    try:
        return _train(run, stop)
    except OSError as e:  # a write that failed outside the checked places (disk full, ...)
        where = e.filename or run.output
        raise OutputError(f"cannot write {where}: {e.strerror or e}") from None
    finally:
        stop.restore()
        run.reporter.close()
        if run.lock is not None:
            run.lock.release()


def _train(run: _Run, stop: _StopFlag) -> TrainResult:
    config, world, output = run.config, run.world, run.output
    started = time.perf_counter()
    captions = None  # --objective aimv2: captions, tokenizer and model config
    if config.objective == "aimv2":
        if world.size > 1:
            raise BadInputError("--objective aimv2 trains in one process only")
        captions = prepare_captions(config, output)
        model_config, preprocessing = captions.model_config, captions.preprocessing
    else:
        model_config, preprocessing = resolve_model(config)
    run.model_config = model_config
    mx.random.seed(config.seed)
    model = build_model(model_config)
    model.set_grad_checkpoint(config.grad_checkpoint)
    encoder = model.encoder.args
    num_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    trunk_params = sum(v.size for _, v in tree_flatten(model.encoder.parameters()))

    images = captions.images if captions else _gather(lambda: find_training_images(config), world)

    # output directory: checked and locked by rank 0 before anything is written
    error = None
    if world.is_main:
        try:
            needed = (config.keep_checkpoints + 1) * 12 * num_params + 4 * trunk_params + 2**24
            preflight(output, needed, OWN_FILES)
            run.lock = OutputLock(output).acquire()
            run.reporter.start()
            if captions is not None:
                captions.tokenizer.save(output / TOKENIZER_FILE)
            if run.lock.recovered:
                run.log(f"recovered a stale lock left by a run that is gone ({run.lock.recovered})")
        except TrainError as e:
            error = e
    agree(error, world)
    for problem in images.errors:
        run.on_image_error(problem)
    counts = gather_ints([len(images.train)], world)
    if len({c[0] for c in counts}) > 1:
        raise BadInputError(
            f"the processes see different numbers of training images {[c[0] for c in counts]}; "
            "every machine needs the same --data"
        )

    schedule = warmup_cosine(config.lr, config.warmup, config.steps, config.min_lr)
    optimizer = build_optimizer(
        model, schedule, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2)
    )
    resumed: Checkpoint | None = None
    if world.is_main:
        resumed = _gather(lambda: _restore(run, model, optimizer, model_config), world)
    else:
        agree(None, world)
    start_step, loader_starts = _sync_start(run, resumed, model, optimizer)

    local_batch = config.batch_size // world.size
    transform = TrainTransform(
        encoder.image_size,
        preprocessing.mean,
        preprocessing.std,
        scale=(config.min_crop_scale, 1.0),
        hflip=config.hflip,
    )
    evaluation = Preprocess(
        preprocessing.resize, preprocessing.crop, preprocessing.mean, preprocessing.std
    )
    if preprocessing.crop != encoder.image_size or preprocessing.native:
        evaluation = Preprocess(
            encoder.image_size, encoder.image_size, preprocessing.mean, preprocessing.std
        )
    try:
        loader = ImageLoader(
            images.train,
            transform,
            local_batch,
            seed=config.seed,
            rank=world.rank,
            world_size=world.size,
            num_workers=config.workers,
            on_error=run.on_image_error,
            start=loader_starts[world.rank],
            **(
                {"labels": captions.train_sequences, "opener": captions.open_image}
                if captions
                else {}
            ),
        )
    except ValueError as e:
        raise BadInputError(f"--data {images.description}: {e}") from None
    val_subset = fixed_subset(images.val, config.val_images, config.seed)
    if captions is not None:
        validation = CaptionValidation(run, captions, config.val_images, evaluation, local_batch)
    else:
        validation = Validation(run, val_subset, evaluation, encoder.num_patches, local_batch)

    if world.is_main:
        if start_step:
            run.metrics.truncate_after(start_step)
        _write_run_file(run, model_config, preprocessing, images, start_step, world)
        run.log(
            f"mlx-aim train: {config.model_name} ({trunk_params / 1e6:.2f}M trunk + "
            f"{(num_params - trunk_params) / 1e6:.2f}M head parameters, {encoder.image_size} px, "
            f"patch {encoder.patch_size}), {len(images.train)} training and "
            f"{len(val_subset)} validation images from {images.description}; "
            f"batch {config.batch_size}"
            + (f" ({world.size} processes x {local_batch})" if world.size > 1 else "")
            + (f" x {config.grad_accum} accumulated" if config.grad_accum > 1 else "")
            + f", {config.steps} steps, lr {config.lr:g}, {config.dtype}, {_device()}"
            + (f", BLAS {blas_info().name}" if blas_info() else "")
        )
        run.log(f"output: {output}" + (f" (resuming at step {start_step})" if start_step else ""))
        if start_step >= config.steps:
            run.log(f"the run already reached step {start_step}; raise --steps to train longer")
        run.reporter.advance(start_step)

    if mx.metal.is_available():  # keep the model resident on Apple silicon (as mlx-lm does)
        mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])
    compute_dtype = mx.bfloat16 if config.dtype == "bfloat16" else mx.float32
    if captions is not None:
        train_step = make_multimodal_train_step(
            model,
            optimizer,
            pad=captions.tokenizer.pad,
            alpha=config.alpha,
            grad_clip=config.grad_clip,
            compute_dtype=compute_dtype,
        )
    else:
        train_step = make_train_step(
            model,
            optimizer,
            global_batch=config.batch_size,
            rank=world.rank,
            world_size=world.size,
            grad_clip=config.grad_clip,
            compute_dtype=compute_dtype,
            paired_prefixes=config.paired_prefixes,
        )
    previews = (
        Previews(run, val_subset or images.train, evaluation, encoder) if world.is_main else None
    )

    loop = _Loop(run, model, optimizer, train_step, loader, validation, previews, start_step)
    if resumed is not None:
        loop.restore(resumed.state.get("loop", {}))
    elif start_step == 0 and validation.enabled:
        loop.initial_val_loss = validation.evaluate(model, 0)
    try:
        loop.run(stop)
    except NonFiniteError as e:
        last = list_checkpoints(output)
        if last:
            where = (
                f"{last[0][1]} (step {last[0][0]}); run again with a lower --lr to resume from it"
            )
        else:
            where = "none (no checkpoint was written); run again with a lower --lr"
        raise NonFiniteError(f"{e}; last good checkpoint: {where}", e.step) from None

    if loop.interrupted and loop.step == start_step:
        raise Interrupted(f"interrupted at step {loop.step}, before any training step")
    final_val = loop.last_val
    if validation.enabled and loop.last_val_step != loop.step:
        final_val = validation.evaluate(model, loop.step)
    if previews is not None and config.preview_every and loop.last_preview_step != loop.step:
        previews.write(model, loop.step)
    if loop.last_checkpoint != loop.step:
        loop.checkpoint()
    if world.is_main:
        _export(model.encoder, output, preprocessing)
        _draw_loss_curve(run)
    if loop.interrupted:
        raise Interrupted(
            f"interrupted at step {loop.step}; checkpoint and model written to {output}; run the "
            "same command to continue"
        )
    elapsed = time.perf_counter() - started
    result = TrainResult(
        output=output,
        step=loop.step,
        resumed_from=start_step or None,
        initial_loss=loop.initial_loss,
        final_loss=loop.final_loss,
        initial_val_loss=loop.initial_val_loss,
        val_loss=final_val,
        images_per_second=loop.images_per_second,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        elapsed_s=elapsed,
        skipped_files=list(run.skipped),
        model=model,
    )
    if world.is_main:
        run.reporter.stop_display()
        run.reporter.log(_summary(result), always=True)
    return result


def set_random_key(key: list[int]) -> None:
    """Set MLX's global random key (two uint32): ``seed(s)`` makes the key ``(s >> 32, s % 2**32)``."""
    mx.random.seed((int(key[0]) << 32) | int(key[1]))
    if np.array(mx.random.state[0]).tolist() != [int(k) for k in key]:
        raise RuntimeError("this MLX version seeds differently; cannot restore the random state")


def _gather(fn: Callable, world: World):
    """Run ``fn`` on this rank; when any rank fails, every rank raises (see ``agree``)."""
    try:
        value = fn()
    except TrainError as e:
        agree(e, world)
        raise
    agree(None, world)
    return value


def _restore(run: _Run, model: nn.Module, optimizer, model_config: dict) -> Checkpoint | None:
    """Load the newest good checkpoint of the output directory into the model and optimizer."""
    config = run.config
    checkpoint = load_latest_checkpoint(run.output, run.log)
    if checkpoint is None:
        if config.resume:
            raise BadInputError(f"--resume: no checkpoint in {run.output}")
        return None
    saved = checkpoint.state.get("config", {})
    defaults = TrainConfig().to_dict()  # for settings added after the checkpoint was written
    for name in FIXED_ON_RESUME:
        before = saved.get(name, defaults[name])
        if before != getattr(config, name):
            flag = name.replace("_", "-")
            raise BadInputError(
                f"{run.output} holds a run with --{flag} {before!r}, this command has "
                f"{getattr(config, name)!r}; a resumed run keeps it (use another --output to start "
                "a new run)"
            )
    if checkpoint.state.get("model_config") != model_config:
        raise BadInputError(
            f"{run.output} holds a run of a different model than --model {config.model}"
        )
    if checkpoint.state.get("world_size") != run.world.size:
        raise BadInputError(
            f"{run.output} was written by {checkpoint.state.get('world_size')} processes; resume "
            f"it with the same number (this run has {run.world.size})"
        )
    changed = [
        f"--{k.replace('_', '-')} {saved[k]!r} -> {v!r}"
        for k, v in config.to_dict().items()
        if k in saved and saved[k] != v and k not in ("resume", "output")
    ]
    try:
        weights = checkpoint.arrays["model.safetensors"]
        model.load_weights(list(weights.items()), strict=True)
        current = dict(tree_flatten(optimizer.state))
        state = checkpoint.arrays["optimizer.safetensors"]
        if set(state) != set(current) or any(state[k].shape != current[k].shape for k in state):
            raise ValueError("the optimizer state does not match the model")
        optimizer.state = tree_unflatten(list(state.items()))
        optimizer.init(model.trainable_parameters())
        set_random_key(checkpoint.state["random_state"])
    except (KeyError, ValueError) as e:
        raise BadInputError(f"{checkpoint.path}: cannot restore this checkpoint ({e})") from None
    run.log(f"resuming from {checkpoint.path} (step {checkpoint.step})")
    if changed:
        run.log("settings changed since the checkpoint: " + ", ".join(changed))
    run.skipped.extend(checkpoint.state.get("skipped_files", []))
    return checkpoint


def _sync_start(run: _Run, checkpoint: Checkpoint | None, model, optimizer) -> tuple[int, list]:
    """The resume step and every rank's loader start, with rank 0's state on every rank."""
    world = run.world
    size = world.size
    ints = [0] * (1 + 2 * size)
    if checkpoint is not None:
        ints[0] = checkpoint.step
        for r, (epoch, cursor) in enumerate(checkpoint.state["loaders"]):
            ints[1 + 2 * r : 3 + 2 * r] = [epoch, cursor]
    ints = broadcast_ints(ints, world)
    if size > 1:
        model.update(broadcast(model.parameters(), world))
        optimizer.state = broadcast(optimizer.state, world)
        optimizer.init(model.trainable_parameters())
        set_random_key(broadcast({"key": mx.random.state[0]}, world)["key"].tolist())
    mx.eval(model.parameters(), optimizer.state, mx.random.state)
    step = ints[0]
    skipped = sorted(set(run.skipped)) if checkpoint is not None else []
    starts = [
        {"epoch": ints[1 + 2 * r], "cursor": ints[2 + 2 * r], "bad": skipped} if step else None
        for r in range(size)
    ]
    return step, starts


class _Loop:
    """The training loop proper, with its logging, validation, previews and checkpoints."""

    def __init__(self, run, model, optimizer, train_step, loader, validation, previews, step):
        self.ctx, self.model, self.optimizer = run, model, optimizer
        self.train_step, self.loader = train_step, loader
        self.validation, self.previews = validation, previews
        self.step = step
        self.last_checkpoint = step if step else None
        self.last_val, self.last_val_step = None, None
        self.last_preview_step = None
        self.initial_loss = self.initial_val_loss = self.final_loss = None
        self.window: list[float] = []  # train losses since the last logging step
        self.parts_window: list[list[float]] = []  # aimv2: [image, text] losses, same steps
        self.images_per_second = 0.0
        self.interrupted = False

    def _next_batches(self, batches: Iterator[dict]) -> list:
        """Micro-batches: images, or (images, caption sequences) for --objective aimv2."""
        out = []
        for _ in range(self.ctx.config.grad_accum):
            try:
                batch = next(batches)
            except ValueError as e:  # no readable image in a whole epoch
                raise BadInputError(f"--data: {e}") from None
            images = mx.array(batch["images"])
            out.append((images, mx.array(batch["labels"])) if "labels" in batch else images)
        return out

    def run(self, stop: _StopFlag) -> None:
        config = self.ctx.config
        batches = iter(self.loader)
        timed_steps, timed_seconds, first = 0, 0.0, True
        try:
            while self.step < config.steps:
                if stop.requested:
                    self.interrupted = True
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
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    what = "loss" if not math.isfinite(loss) else "gradient norm"
                    raise NonFiniteError(
                        f"non-finite {what} at step {self.step} (loss {loss}, gradient norm "
                        f"{norm}); the learning rate (--lr {config.lr:g}) is probably too high",
                        self.step,
                    )
                if self.initial_loss is None and self.step == 1:
                    self.initial_loss = loss
                self.window.append(loss)
                self.ctx.reporter.advance(self.step, loss)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    self._log(norm, timed_steps, timed_seconds)
                    self.window, self.parts_window = [], []
                if config.val_every and self.step % config.val_every == 0:
                    self.last_val = self.validation.evaluate(self.model, self.step)
                    self.last_val_step = self.step
                if self.previews and config.preview_every and self.step % config.preview_every == 0:
                    self.previews.write(self.model, self.step)
                    self.last_preview_step = self.step
                if self.step % config.checkpoint_every == 0:
                    self.checkpoint()
        finally:
            batches.close()

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the logging window and the initial losses of a checkpointed run."""
        self.window = list(state.get("window", []))
        self.parts_window = list(state.get("parts_window", []))
        self.initial_loss = state.get("initial_loss")
        self.initial_val_loss = state.get("initial_val_loss")

    def _log(self, norm: float, timed_steps: int, timed_seconds: float) -> None:
        config = self.ctx.config
        self.final_loss = sum(self.window) / len(self.window)
        seconds_per_step = timed_seconds / timed_steps if timed_steps else None
        images = config.batch_size * config.grad_accum
        if seconds_per_step:
            self.images_per_second = images / seconds_per_step
        lr = self.optimizer.learning_rate.item()
        record = {
            "split": "train",
            "step": self.step,
            "loss": self.final_loss,
            "grad_norm": norm,
            "lr": lr,
            "images_per_s": self.images_per_second,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "eta_s": (config.steps - self.step) * (seconds_per_step or 0.0),
            "skipped_files": len(set(self.ctx.skipped)),
            "time": time.time(),
        }
        if self.parts_window:
            image, text = np.mean(self.parts_window, axis=0).tolist()
            record.update(image_loss=image, text_loss=text)
        if self.ctx.world.is_main:
            self.ctx.metrics.append(record)
            self.ctx.reporter.step(self.step, {**record, "val_loss": self.last_val})

    def checkpoint(self) -> None:
        """Write the checkpoint of the current step (rank 0), with every rank's data position."""
        run = self.ctx
        position = self.loader.state()
        loaders = gather_ints([position["epoch"], position["cursor"]], run.world)
        error = None
        if run.world.is_main:
            state = {
                "config": run.config.to_dict(),
                "model_config": run.model_config,
                "world_size": run.world.size,
                "random_state": np.array(mx.random.state[0]).tolist(),
                "loaders": loaders,
                "skipped_files": sorted(set(run.skipped)),
                "loop": {
                    "window": self.window,
                    "parts_window": self.parts_window,
                    "initial_loss": self.initial_loss,
                    "initial_val_loss": self.initial_val_loss,
                },
                "time": time.time(),
            }
            arrays = {
                "model.safetensors": dict(tree_flatten(self.model.parameters())),
                "optimizer.safetensors": dict(tree_flatten(self.optimizer.state)),
            }
            try:
                path = save_checkpoint(
                    run.output, self.step, arrays, state, run.config.keep_checkpoints
                )
                run.log(f"step {self.step} checkpoint {path}")
            except TrainError as e:
                error = e
        agree(error, run.world)
        self.last_checkpoint = self.step


def _device() -> str:
    return str(mx.default_device().type).rsplit(".", 1)[-1]


def _write_run_file(run, model_config, preprocessing, images, start_step, world) -> None:
    import mlx_aim

    info = {
        "config": run.config.to_dict(),
        "model_config": model_config,
        "preprocessing": preprocessing.to_dict(),
        "train_images": len(images.train),
        "val_images": len(images.val),
        "data": images.description,
        "world_size": world.size,
        "resumed_from": start_step or None,
        "versions": {"mlx": mx.__version__, "mlx_aim": mlx_aim.__version__},
        "device": _device(),
        "blas": str(blas_info()) if blas_info() else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        write_json(run.output / RUN_FILE, info)
    except OSError as e:
        raise OutputError(f"cannot write {run.output / RUN_FILE}: {e.strerror or e}") from None


def _export(encoder: nn.Module, output: Path, preprocessing: Preprocessing) -> None:
    """Write the trunk at the root of ``output`` in the format ``mlx_aim.load`` reads.

    The files are written into a temporary folder and moved into place one by one, with
    ``config.json`` last (a reader never sees a config without its weights).
    """
    tmp = output / ".export.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(encoder, tmp, preprocessing=preprocessing)
        names = sorted(os.listdir(tmp), key=lambda n: n == CONFIG_FILE)
        for stale in output.glob("model*.safetensors*"):
            if stale.name not in names:
                stale.unlink()
        if INDEX_FILE not in names:
            (output / INDEX_FILE).unlink(missing_ok=True)
        for name in names:
            os.replace(tmp / name, output / name)
    except OSError as e:
        raise OutputError(
            f"cannot export the trained trunk to {output}: {e.strerror or e}"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _draw_loss_curve(run: _Run) -> None:
    records = run.metrics.read()
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val"]
    try:
        save_png(
            loss_curve_image(train, val, title=f"{run.config.model_name} next-patch loss"),
            run.output / LOSS_CURVE_FILE,
        )
    except OSError as e:
        raise OutputError(
            f"cannot write {run.output / LOSS_CURVE_FILE}: {e.strerror or e}"
        ) from None


def _summary(result: TrainResult) -> str:
    def arrow(a, b):
        if a is None or b is None:
            return f"{b:.4f}" if b is not None else "n/a"
        return f"{a:.4f} -> {b:.4f}"

    skipped = len(set(result.skipped_files))
    return (
        f"done: step {result.step} in {result.elapsed_s:.0f} s, train loss "
        f"{arrow(result.initial_loss, result.final_loss)}, validation loss "
        f"{arrow(result.initial_val_loss, result.val_loss)}, {result.images_per_second:.1f} "
        f"images/s, peak memory {result.peak_memory_gb:.2f} GB"
        + (f", {skipped} unreadable files skipped" if skipped else "")
        + f". Trained trunk: {result.output} (mlx_aim.load / mlx-aim probe --model / mlx-aim "
        "embed --model)"
    )


__all__ = ["TrainResult", "set_random_key", "train"]
