"""``train(config)``: one AIM pre-training run from images to an exported trunk.

Order of a run: check the settings; join the distributed group (when launched by ``mlx.launch``);
resolve the model and find the images; check and lock the output directory (rank 0); build the
model and optimizer, or restore them from the newest intact checkpoint in the output directory;
train, logging, validating, previewing and checkpointing at their intervals; finally export the
trunk at the root of the output directory (``config.json``, ``model.safetensors``,
``preprocess.json``) and draw the loss curve.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .. import io
from ..checkpoints.weights import CONFIG_FILE, INDEX_FILE, PREPROCESS_FILE, WEIGHTS_FILE, save_model
from ..cpu.blas import blas_info
from ..cpu.memory import reuse_freed_buffers
from ..data.loader import ImageLoader
from ..data.transforms import Preprocessing, TrainTransform
from ..errors import InputError, Interrupted, MlxAimError, NonFiniteError
from ..messages import plural
from ..models import build_model
from ..objectives.next_patch import Variant
from ..objectives.patch_order import patch_order
from ..random_key import random_key, set_random_key
from ..text.caption_bpe import TOKENIZER_FILE, CaptionTokenizer
from .checkpoint import CHECKPOINTS, STATE_FILE, Checkpoint, CheckpointStore, checkpoint_bytes
from .config import TrainConfig
from .distributed import World, agree, broadcast, broadcast_ints, gather_ints, init_world
from .evaluation import PREVIEWS, Previews, Validation
from .inputs import Images, SkippedFiles, find_training_images, fixed_subset, resolve_model
from .multimodal import CaptionInputs, CaptionValidation, prepare_captions
from .multimodal_step import make_multimodal_train_step
from .optim import build_optimizer, warmup_cosine
from .output import LOCK_FILE, OutputLock, preflight, remove_leftovers
from .report import LOG_FILE, METRICS_FILE, MetricsLog, Reporter, loss_curve_image, save_png
from .resume import DATA_FILE, check_resumable, data_listing, restore
from .step import make_train_step
from .stopping import StopSignals

if TYPE_CHECKING:
    from .tracking import DownstreamProbe

RUN_FILE = "run.json"
LOSS_CURVE_FILE = "loss.png"
# The trunk is saved here, then its files are moved to the root of the output directory.
_EXPORT_STAGING = f".{WEIGHTS_FILE}.export{io.TEMP_SUFFIX}"
# What a run writes into its output directory (anything else there makes preflight refuse it).
OWN_FILES = frozenset(
    {RUN_FILE, LOSS_CURVE_FILE, PREVIEWS, CHECKPOINTS, LOCK_FILE, METRICS_FILE, LOG_FILE,
     CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, PREPROCESS_FILE, TOKENIZER_FILE}
)  # fmt: skip
T = TypeVar("T")


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
    images_per_second: float | None  # None when this call trained no step
    peak_memory_gb: float
    elapsed_s: float
    skipped_files: list[str] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)  # the pre-training model


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a pre-training run; see the module docstring.

    Raises :class:`~mlx_aim.errors.MlxAimError` subclasses with one-line messages and the shared
    exit codes: ``InputError`` (1), ``OutputError`` (3), ``NonFiniteError`` (5) and
    ``Interrupted`` (130 / 143 / 129 for SIGINT / SIGTERM / SIGHUP, after a checkpoint).
    """
    config.validate()
    reuse_freed_buffers()
    world = init_world()
    if config.batch_size % world.size:
        raise InputError(
            f"--batch-size {config.batch_size} must be a multiple of the {world.size} processes"
        )
    reporter = Reporter(config.output_dir, config.steps, enabled=world.is_main, quiet=config.quiet)
    stop = StopSignals(enabled=world.size == 1, at_once=True)  # until the loop starts
    try:
        with contextlib.ExitStack() as cleanup:
            return _train(config, world, reporter, stop, cleanup)
    except OSError as e:  # a write that failed outside the checked places (disk full, ...)
        raise io.output_error(e.filename or config.output_dir, e) from None
    finally:
        stop.restore()
        reporter.close()


def _train(
    config: TrainConfig,
    world: World,
    reporter: Reporter,
    stop: StopSignals,
    cleanup: contextlib.ExitStack,
) -> TrainResult:
    started = time.perf_counter()
    output = config.output_dir
    captions = _captions(config, world)  # --objective aimv2: captions, tokenizer, model config
    model_config, preprocessing = (
        (captions.model_config, captions.preprocessing) if captions else resolve_model(config)
    )
    mx.random.seed(config.seed)
    model = build_model(model_config)
    model.set_grad_checkpoint(config.grad_checkpoint)
    images = (
        captions.images if captions else _on_every_rank(lambda: find_training_images(config), world)
    )
    listing = data_listing([*images.train, *images.val], captions) if world.is_main else {}
    probe = _on_main(lambda: _downstream_probe(config, preprocessing, model, reporter), world)
    store = CheckpointStore(output, config.keep_checkpoints, reporter.log)
    _on_main(lambda: _open_output(config, model, reporter, cleanup), world)
    if captions is not None and world.is_main:
        captions.tokenizer.save(output / TOKENIZER_FILE)

    schedule = warmup_cosine(config.lr, config.warmup, config.steps, config.min_lr)
    optimizer = build_optimizer(
        model, schedule, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2)
    )
    resumed = _on_main(
        lambda: _resume(config, world, model, optimizer, model_config, listing, store), world
    )
    skipped = SkippedFiles(lambda m: reporter.log(m, always=True), world)
    if resumed is not None:
        skipped.restore(resumed.state.get("skipped_files", []))
    start_step, loader_starts = _sync_start(world, resumed, model, optimizer, skipped)
    for problem in images.errors:
        skipped(problem)
    _check_same_image_count(images, world)

    encoder = model.encoder.args
    loader = _training_loader(
        config, world, images, preprocessing, encoder, loader_starts, skipped, captions
    )
    validation, previews = _evaluators(
        config, world, images, preprocessing, encoder, skipped, captions
    )
    metrics = MetricsLog(output)
    if world.is_main:
        if start_step:
            metrics.truncate_after(start_step)
        _write_run_file(config, model_config, preprocessing, images, start_step, world)
        _log_header(config, world, model, images, len(validation.subset), start_step, reporter)

    if mx.metal.is_available():  # keep the model resident on Apple silicon (as mlx-lm does)
        mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])
    loop = _Loop(
        config,
        world,
        model,
        optimizer,
        _compiled_step(config, world, model, optimizer, captions),
        loader,
        start_step,
        validation=validation,
        previews=previews,
        probe=probe,
        reporter=reporter,
        metrics=metrics,
        store=store,
        documents=_checkpoint_documents(config, model_config, world, listing),
        skipped=skipped,
    )
    if resumed is not None:
        loop.restore(resumed.state.get("loop", {}))
    else:
        loop.evaluate_start()
    _run_loop(loop, stop, store)
    return _finish(loop, config, preprocessing, reporter, start_step, started)


def _on_every_rank(fn: Callable[[], T], world: World) -> T:
    """Run ``fn`` on every rank; when any rank fails, every rank raises (see ``agree``)."""
    try:
        value = fn()
    except MlxAimError as e:
        agree(e, world)
        raise
    agree(None, world)
    return value


def _on_main(fn: Callable[[], T], world: World) -> T | None:
    """Run ``fn`` on rank 0 only (None elsewhere); a failure there stops every rank."""
    return _on_every_rank(fn if world.is_main else lambda: None, world)


def _captions(config: TrainConfig, world: World) -> CaptionInputs | None:
    """The captions, tokenizer and model config of an ``--objective aimv2`` run, else None."""
    if config.objective != "aimv2":
        return None
    captions = _on_every_rank(lambda: prepare_captions(config, config.output_dir), world)
    _check_same_tokenizer(captions.tokenizer, world)
    return captions


def _check_same_tokenizer(tokenizer: CaptionTokenizer, world: World) -> None:
    """Refuse a run whose ranks built different caption tokenizers (they would train apart)."""
    digest = hashlib.sha256(tokenizer.tokenizer.to_str().encode()).digest()
    fingerprints = gather_ints([int.from_bytes(digest[i : i + 3], "big") for i in (0, 3)], world)
    if any(f != fingerprints[0] for f in fingerprints):
        raise InputError(
            "the processes built different caption tokenizers; give every machine the same "
            "--data, or the same --tokenizer"
        )


def _open_output(
    config: TrainConfig, model: nn.Module, reporter: Reporter, cleanup: contextlib.ExitStack
) -> None:
    """Check, lock and clean the output directory, then start the log (rank 0)."""
    output = config.output_dir
    num_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    trunk_params = sum(v.size for _, v in tree_flatten(model.encoder.parameters()))
    # float32 weights + two AdamW moments per checkpoint, one more being written, and the trunk
    needed = (config.keep_checkpoints + 1) * 12 * num_params + 4 * trunk_params + 2**24
    reusable = checkpoint_bytes(output) + sum(
        p.stat().st_size for p in output.glob("model*.safetensors") if p.is_file()
    )
    preflight(output, needed, OWN_FILES, reusable)
    lock = OutputLock(output).acquire()
    cleanup.callback(lock.release)
    for folder in (output, output / CHECKPOINTS, output / PREVIEWS):
        remove_leftovers(folder)
    reporter.start()
    if lock.recovered:
        reporter.log(f"recovered a stale lock left by a run that is gone ({lock.recovered})")


def _resume(
    config: TrainConfig,
    world: World,
    model: nn.Module,
    optimizer,
    model_config: dict[str, Any],
    listing: dict[str, Any],
    store: CheckpointStore,
) -> Checkpoint | None:
    """Load the newest intact checkpoint into the model and optimizer (rank 0), if there is one."""
    checkpoint = store.load_latest()
    if checkpoint is None:
        if config.resume:
            raise InputError(f"--resume: no checkpoint in {config.output_dir}")
        return None
    changed = check_resumable(checkpoint, config, model_config, world.size, listing)
    restore(checkpoint, model, optimizer)
    store.prune()  # damaged checkpoints newer than this one go now
    store.log(f"resuming from {checkpoint.path} (step {checkpoint.step})")
    if changed:
        store.log("changed since the checkpoint: " + ", ".join(changed))
    return checkpoint


def _sync_start(
    world: World, checkpoint: Checkpoint | None, model: nn.Module, optimizer, skipped: SkippedFiles
) -> tuple[int, list[dict | None]]:
    """The resume step and every rank's loader start, with rank 0's state on every rank."""
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
    bad = sorted(skipped.paths)
    starts = [
        {"epoch": ints[1 + 2 * r], "cursor": ints[2 + 2 * r], "bad": bad} if step else None
        for r in range(size)
    ]
    return step, starts


def _check_same_image_count(images: Images, world: World) -> None:
    counts = gather_ints([len(images.train)], world)
    if len({c[0] for c in counts}) > 1:
        raise InputError(
            f"the processes see different numbers of training images {[c[0] for c in counts]}; "
            "every machine needs the same --data"
        )


def _training_loader(
    config: TrainConfig,
    world: World,
    images: Images,
    preprocessing: Preprocessing,
    encoder,
    starts: list[dict | None],
    skipped: SkippedFiles,
    captions: CaptionInputs | None = None,
) -> ImageLoader:
    """This rank's shuffled, augmented share of every global batch (with caption tokens for
    ``--objective aimv2``)."""
    paired = {"labels": captions.train_sequences, "opener": captions.open_image} if captions else {}
    transform = TrainTransform(
        encoder.image_size,
        preprocessing.mean,
        preprocessing.std,
        scale=(config.min_crop_scale, 1.0),
        hflip=config.hflip,
    )
    try:
        return ImageLoader(
            images.train,
            transform,
            config.batch_size // world.size,
            seed=config.seed,
            rank=world.rank,
            world_size=world.size,
            num_workers=config.workers,
            on_error=skipped,
            start=starts[world.rank],
            **paired,
        )
    except ValueError as e:
        raise InputError(f"--data {images.description}: {e}") from None


def _evaluation_preprocess(preprocessing: Preprocessing, encoder) -> Preprocessing:
    """The model's evaluation preprocessing, at the size the pre-training model takes."""
    if preprocessing.crop != encoder.image_size or preprocessing.native:
        size = encoder.image_size
        return Preprocessing(size, size, preprocessing.mean, preprocessing.std)
    return Preprocessing(
        preprocessing.resize, preprocessing.crop, preprocessing.mean, preprocessing.std
    )


def objective_variant(config: TrainConfig, encoder) -> Variant:
    """The objective ``config`` asks for (targets, attention, patch order) on ``encoder``'s grid."""
    grid = encoder.image_size // encoder.patch_size
    order = None
    if config.patch_order != "raster":  # raster order permutes nothing
        order = tuple(patch_order(config.patch_order, grid, grid, config.seed).tolist())
    return Variant(target=config.target, attention=config.attention, order=order)


def objective_label(config: TrainConfig) -> str:
    """The switches in a few words, for titles: "norm-pixels, prefix attention, raster order,
    crop 0.4-1" (and the pixel head's depth and width when set)."""
    if config.objective == "aimv2":
        label = f"AIMv2 objective, alpha {config.alpha:g}"
    else:
        label = f"{config.target}, {config.attention} attention, {config.patch_order} order"
    label += f", crop {config.min_crop_scale:g}-1"
    if config.head_blocks is not None:
        label += f", {plural(config.head_blocks, 'head block')}"
    if config.head_width is not None:
        label += f", head width {config.head_width}"
    return label


def _evaluators(
    config: TrainConfig,
    world: World,
    images: Images,
    preprocessing: Preprocessing,
    encoder,
    skipped: SkippedFiles,
    captions: CaptionInputs | None = None,
) -> tuple[Validation | CaptionValidation, Previews | None]:
    """The validation loss on a fixed subset and the previews (rank 0, when asked for)."""
    evaluation = _evaluation_preprocess(preprocessing, encoder)
    val_subset = fixed_subset(images.val, config.val_images, config.seed)
    validation = (
        CaptionValidation(
            captions,
            config.val_images,
            evaluation,
            config.batch_size // world.size,
            seed=config.seed,
            alpha=config.alpha,
            world=world,
            workers=config.workers,
            on_error=skipped,
        )
        if captions
        else Validation(
            val_subset,
            evaluation,
            encoder.num_patches,
            config.batch_size // world.size,
            seed=config.seed,
            world=world,
            workers=config.workers,
            on_error=skipped,
            variant=objective_variant(config, encoder),
        )
    )
    previews = None
    if world.is_main and config.preview_every:
        previews = Previews(
            val_subset or images.train,
            evaluation,
            encoder,
            config.preview_images,
            config.output_dir / PREVIEWS,
            f"{config.model_name} ({objective_label(config)})",
            objective_variant(config, encoder),
            **(_caption_previews(captions, evaluation) if captions else {}),
        )
    return validation, previews


def _caption_previews(captions: CaptionInputs, evaluation: Preprocessing) -> dict[str, Any]:
    """The arguments that make AIMv2 previews show greedy captions next to the true ones."""
    from ..tasks.caption import Captioner  # it reads checkpoints: mlx_aim.train is imported first

    def describe(model: nn.Module, images: mx.array) -> list[str]:
        return Captioner(model, captions.tokenizer, evaluation).generate(images)

    return {
        "opener": captions.open_image,
        "describe": describe,
        "truth": lambda path: captions.captions.get(path, ""),
    }


def _downstream_probe(
    config: TrainConfig, preprocessing: Preprocessing, model: nn.Module, reporter: Reporter
) -> DownstreamProbe | None:
    """The quick probe on ``--probe-data``, if asked for (rank 0)."""
    if config.probe_data is None:
        return None
    from .tracking import DownstreamProbe  # mlx_aim.tasks.probe imports this package

    return DownstreamProbe(
        config.probe_data,
        _evaluation_preprocess(preprocessing, model.encoder.args),
        workers=config.workers,
        on_error=lambda e: reporter.log(f"--probe-data: skipping unreadable image {e}"),
    )


def _compiled_step(
    config: TrainConfig,
    world: World,
    model: nn.Module,
    optimizer,
    captions: CaptionInputs | None = None,
):
    """The compiled optimizer step of this rank (``step.make_train_step``, or the multimodal
    step of ``--objective aimv2``)."""
    compute_dtype = mx.bfloat16 if config.dtype == "bfloat16" else mx.float32
    if captions is not None:
        return make_multimodal_train_step(
            model,
            optimizer,
            pad=captions.tokenizer.pad,
            rank=world.rank,
            world_size=world.size,
            alpha=config.alpha,
            grad_clip=config.grad_clip,
            compute_dtype=compute_dtype,
        )
    return make_train_step(
        model,
        optimizer,
        global_batch=config.batch_size,
        rank=world.rank,
        world_size=world.size,
        grad_clip=config.grad_clip,
        compute_dtype=compute_dtype,
        paired_prefixes=config.paired_prefixes,
        variant=objective_variant(config, model.encoder.args),
    )


def _checkpoint_documents(
    config: TrainConfig, model_config: dict[str, Any], world: World, listing: dict[str, Any]
) -> dict[str, Any]:
    """The parts of every checkpoint's JSON files that stay the same during a run."""
    state = {"config": config.to_dict(), "model_config": model_config, "world_size": world.size}
    return {STATE_FILE: state, DATA_FILE: listing}


def _device() -> str:
    return str(mx.default_device().type).rsplit(".", 1)[-1]


def _blas_name() -> str:
    """The BLAS serving MLX's CPU matmuls."""
    info = blas_info()
    if info is not None:
        return " ".join(part for part in (info.name, info.version) if part)
    return "Accelerate" if sys.platform == "darwin" else "MLX's bundled reference BLAS"


def _log_header(
    config: TrainConfig,
    world: World,
    model: nn.Module,
    images: Images,
    val_images: int,
    start_step: int,
    reporter: Reporter,
) -> None:
    encoder = model.encoder.args
    num_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    trunk_params = sum(v.size for _, v in tree_flatten(model.encoder.parameters()))
    local_batch = config.batch_size // world.size
    reporter.log(
        f"mlx-aim train: {config.model_name} ({trunk_params / 1e6:.2f}M trunk + "
        f"{(num_params - trunk_params) / 1e6:.2f}M head parameters, {encoder.image_size} px, "
        f"patch {encoder.patch_size}), {plural(len(images.train), 'training image')} and "
        f"{plural(val_images, 'validation image')} from {images.description}; "
        f"batch {config.batch_size}"
        + (f" ({world.size} processes x {local_batch})" if world.size > 1 else "")
        + (f" x {config.grad_accum} accumulated" if config.grad_accum > 1 else "")
        + f", {plural(config.steps, 'step')}, lr {config.lr:g}, {config.dtype}, {_device()}"
        + (f", BLAS {_blas_name()}" if _device() == "cpu" else "")
    )
    if config.dtype == "bfloat16" and _device() == "cpu":
        reporter.log(
            "warning: bfloat16 on MLX's CPU backend has no BLAS: matmuls run about 25x slower "
            "than float32 (aim-tiny: 20 s against 0.8 s a step); use --dtype float32 on the CPU",
            always=True,
        )
    output = config.output_dir
    reporter.log(f"output: {output}" + (f" (resuming at step {start_step})" if start_step else ""))
    if start_step >= config.steps:
        reporter.log(f"the run already reached step {start_step}; raise --steps to train longer")
    reporter.advance(start_step)


def _write_run_file(
    config: TrainConfig,
    model_config: dict[str, Any],
    preprocessing: Preprocessing,
    images: Images,
    start_step: int,
    world: World,
) -> None:
    import mlx_aim

    info = {
        "config": config.to_dict(),
        "model_config": model_config,
        "preprocessing": preprocessing.to_dict(),
        "train_images": len(images.train),
        "val_images": len(images.val),
        "data": images.description,
        "world_size": world.size,
        "resumed_from": start_step or None,
        "versions": {"mlx": mx.__version__, "mlx_aim": mlx_aim.__version__},
        "device": _device(),
        "blas": _blas_name(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    io.write_json(config.output_dir / RUN_FILE, info)


class _Loop:
    """The training loop proper, with its logging, validation, previews and checkpoints."""

    def __init__(
        self,
        config: TrainConfig,
        world: World,
        model: nn.Module,
        optimizer,
        train_step: Callable[[list[mx.array]], tuple[mx.array, mx.array]],
        loader: ImageLoader,
        step: int,
        *,
        validation: Validation,
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
        self.train_step, self.loader = train_step, loader
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
        """Micro-batches: images, or (images, caption sequences) for --objective aimv2."""
        out = []
        for _ in range(self.config.grad_accum):
            try:
                batch = next(batches)
            except ValueError as e:  # no readable image in a whole epoch
                raise InputError(f"--data: {e}") from None
            images = mx.array(batch["images"])
            out.append((images, mx.array(batch["labels"])) if "labels" in batch else images)
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


def _run_loop(loop: _Loop, stop: StopSignals, store: CheckpointStore) -> None:
    """Run the loop; a non-finite loss names the last good checkpoint to resume from."""
    stop.at_once = False  # from here a stop signal ends the run after a step and a checkpoint
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


def _finish(
    loop: _Loop,
    config: TrainConfig,
    preprocessing: Preprocessing,
    reporter: Reporter,
    start_step: int,
    started: float,
) -> TrainResult:
    """Evaluate, preview and checkpoint the last step, export the trunk and summarise."""
    output, world = config.output_dir, loop.world
    if loop.stopped_by is not None and loop.step == start_step:
        name = _signal_name(loop.stopped_by)
        raise Interrupted(f"{name} at step {loop.step}, before any training step", loop.stopped_by)
    if loop.validation.enabled and loop.last_val_step != loop.step:
        loop.validate()
    if loop.previews is not None and loop.last_preview_step != loop.step:
        loop.preview()
    if loop.probe is not None and loop.last_probe_step != loop.step:
        loop.probe_trunk()
    if loop.last_checkpoint != loop.step:
        loop.checkpoint()
    if world.is_main:
        _export(loop.model.encoder, output, preprocessing)
        title = f"{config.model_name} next-patch loss ({objective_label(config)})"
        _draw_loss_curve(loop.metrics, output / LOSS_CURVE_FILE, title)
    if loop.stopped_by is not None:
        raise Interrupted(
            f"{_signal_name(loop.stopped_by)} at step {loop.step}; checkpoint and model written "
            f"to {output}; run the same command to continue",
            loop.stopped_by,
        )
    result = TrainResult(
        output=output,
        step=loop.step,
        resumed_from=start_step or None,
        initial_loss=loop.initial_loss,
        final_loss=loop.final_loss,
        initial_val_loss=loop.initial_val_loss,
        val_loss=loop.last_val,
        images_per_second=loop.images_per_second,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        elapsed_s=time.perf_counter() - started,
        skipped_files=sorted(loop.skipped.paths),
        model=loop.model,
    )
    if world.is_main:
        reporter.stop_display()
        reporter.log(summary(result), always=True)
    return result


def _signal_name(signum: int) -> str:
    return f"interrupted by {signal.Signals(signum).name}"


def _export(encoder: nn.Module, output: Path, preprocessing: Preprocessing) -> None:
    """Write the trunk at the root of ``output`` in the format ``mlx_aim.load`` reads.

    The files are written into a hidden staging folder and moved into place one by one, with
    ``config.json`` last (a reader never sees a config without its weights).
    """
    staging = output / _EXPORT_STAGING
    with io.writing(output / WEIGHTS_FILE):
        shutil.rmtree(staging, ignore_errors=True)
        try:
            save_model(encoder, staging, preprocessing=preprocessing)
            names = sorted(os.listdir(staging), key=lambda n: n == CONFIG_FILE)
            for stale in output.glob("model*.safetensors*"):
                if stale.name not in names and stale.is_file():
                    stale.unlink()
            if INDEX_FILE not in names:
                (output / INDEX_FILE).unlink(missing_ok=True)
            for name in names:
                os.replace(staging / name, output / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _draw_loss_curve(metrics: MetricsLog, path: Path, title: str) -> None:
    records = metrics.read()
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val"]
    probe = [(r["step"], r["top1"]) for r in records if r.get("split") == "probe"]
    save_png(loss_curve_image(train, val, title=title, probe=probe), path)


def summary(result: TrainResult) -> str:
    """The final line of a run: losses, speed, memory, skipped files and where the trunk is."""

    def change(first: float | None, last: float | None) -> str:
        if last is None:
            return "n/a"
        return f"{first:.4f} -> {last:.4f}" if first is not None else f"{last:.4f}"

    trained = result.step - (result.resumed_from or 0)
    skipped = len(result.skipped_files)
    return (
        f"done: step {result.step}"
        + (f" ({plural(trained, 'step')} in {result.elapsed_s:.0f} s)" if trained else "")
        + f", train loss {change(result.initial_loss, result.final_loss)}, validation loss "
        f"{change(result.initial_val_loss, result.val_loss)}"
        + (f", {result.images_per_second:.1f} images/s" if result.images_per_second else "")
        + f", peak memory {result.peak_memory_gb:.2f} GB"
        + (f", {plural(skipped, 'unreadable file')} skipped" if skipped else "")
        + f". Trained trunk: {result.output} (mlx_aim.load / mlx-aim probe --model / mlx-aim "
        "embed --model)"
    )


__all__ = ["TrainResult", "summary", "train"]
