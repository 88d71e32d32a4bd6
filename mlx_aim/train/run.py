"""``train(config)``: one AIM pre-training run from images to an exported trunk.

Order of a run: check the settings; join the distributed group (when launched by ``mlx.launch``);
resolve the model and find the images (the objective's plan, ``plans.py``); check and lock the
output directory (rank 0); build the model and optimizer, or restore them from the newest intact
checkpoint in the output directory; train (``loop.py``), logging, validating, previewing and
checkpointing at their intervals; finally export the trunk at the root of the output directory
(``config.json``, ``model.safetensors``, ``preprocess.json``) and draw the loss curve.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import io
from ..checkpoints.weights import CONFIG_FILE, INDEX_FILE, PREPROCESS_FILE, WEIGHTS_FILE, save_model
from ..cpu.blas import blas_info
from ..cpu.memory import reuse_freed_buffers
from ..data.transforms import Preprocessing
from ..errors import InputError, Interrupted
from ..messages import plural
from ..random_key import set_random_key
from ..text.caption_bpe import TOKENIZER_FILE
from .checkpoint import CHECKPOINTS, STATE_FILE, Checkpoint, CheckpointStore, checkpoint_bytes
from .config import TrainConfig, objective_label
from .distributed import World, broadcast, broadcast_ints, gather_ints, init_world, on_main
from .evaluation import PREVIEWS
from .inputs import Images, SkippedFiles, evaluation_preprocess
from .loop import TrainLoop, run_loop
from .optim import build_optimizer, warmup_cosine
from .output import LOCK_FILE, OutputLock, preflight, remove_leftovers
from .plans import plan_for
from .report import LOG_FILE, METRICS_FILE, MetricsLog, Reporter, loss_curve_image, save_png
from .resume import DATA_FILE, check_resumable, data_listing, restore
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
    stop = StopSignals(enabled=world.size == 1)
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
    plan = plan_for(config, world)  # the objective's model config and (aimv2) captions
    model_config, preprocessing = plan.model_config, plan.preprocessing
    mx.random.seed(config.seed)
    model = plan.build_model()
    images = plan.find_images()
    listing = data_listing([*images.train, *images.val]) if world.is_main else {}
    probe = on_main(lambda: _downstream_probe(config, preprocessing, model, reporter), world)
    store = CheckpointStore(output, config.keep_checkpoints, reporter.log)
    on_main(lambda: _open_output(config, model, reporter, cleanup), world)
    if world.is_main:
        plan.save_files(output)

    schedule = warmup_cosine(config.lr, config.warmup, config.steps, config.min_lr)
    optimizer = build_optimizer(
        model, schedule, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2)
    )
    resumed = on_main(
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
    loader = plan.loader(encoder, loader_starts, skipped)
    validation, previews = plan.evaluators(encoder, skipped)
    metrics = MetricsLog(output)
    if world.is_main:
        if start_step:
            metrics.truncate_after(start_step)
        _write_run_file(config, model_config, preprocessing, images, start_step, world)
        _log_header(config, world, model, images, len(validation.subset), start_step, reporter)

    if mx.metal.is_available():  # keep the model resident on Apple silicon (as mlx-lm does)
        mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])
    loop = TrainLoop(
        config,
        world,
        model,
        optimizer,
        plan.train_step(model, optimizer),
        loader,
        start_step,
        inputs=plan.inputs,
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
    run_loop(loop, stop, store)
    return _finish(loop, config, preprocessing, reporter, start_step, started)


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


def _downstream_probe(
    config: TrainConfig, preprocessing: Preprocessing, model: nn.Module, reporter: Reporter
) -> DownstreamProbe | None:
    """The quick probe on ``--probe-data``, if asked for (rank 0)."""
    if config.probe_data is None:
        return None
    from .tracking import DownstreamProbe  # mlx_aim.tasks.probe imports this package

    return DownstreamProbe(
        config.probe_data,
        evaluation_preprocess(preprocessing, model.encoder.args),
        workers=config.workers,
        on_error=lambda e: reporter.log(f"--probe-data: skipping unreadable image {e}"),
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


def _finish(
    loop: TrainLoop,
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
