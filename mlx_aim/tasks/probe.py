"""Attentive and linear probes on frozen AIM trunks (the library side of ``mlx-aim probe``).

The attentive probe is the head of the released AIMv1 checkpoints: BatchNorm without affine on the
mean of the chosen raw block outputs, one learned query with bias-free k/v projections (heads =
trunk heads) and a bias-free linear layer. ``head="linear"`` trains BatchNorm + linear on the
token-mean of the same features, as a baseline. Both train with AdamW, linear warm-up and cosine
decay, and are evaluated with their BatchNorm statistics set to the exact values over the training
features (running averages would depend on the number of steps). The trunk's features are computed
once and cached as float16 on disk (``FeatureCache``), so later epochs and reruns only run the head.

Example::

    model = mlx_aim.load("runs/aim-nano")                 # any trunk mlx_aim.load accepts
    data = load_dataset(builtin_dataset("digits"))
    result = train_probe(model, data, ProbeConfig(epochs=20))
    save_probe(result, "probes/digits")                   # mlx_aim.load() gives the classifier
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ..checkpoints.registry import REGISTRY, default_preprocessing
from ..checkpoints.weights import apply_weights, read_config, read_preprocessing, save_model
from ..data.images import ImageError
from ..data.loader import ImageLoader, find_labeled_images, split_paths
from ..data.transforms import Preprocessing, TrainTransform
from ..errors import InputError
from ..io import atomic_directory, atomic_paths, check_destination, read_json, write_json
from ..models import build_model, build_model_args
from ..models.base import last_six_blocks
from ..models.layers import LinearClassifier, build_classifier
from ..train.optim import warmup_cosine
from .features import (
    BatchRunner,
    FeatureCache,
    FeatureSet,
    crop_transform,
    extract_features,
    items_fingerprint,
    layer_average,
    model_fingerprint,
    vision_model,
)

CLASSES_FILE = "classes.json"
REPORT_FILE = "probe_report.json"
PREDICTIONS_FILE = "predictions.jsonl"
EVAL_REPORT_FILE = "eval_report.json"
HEADS = ("attentive", "linear")
DEFAULT_BATCH_SIZE = 128
SMALL_SET_BATCH_SIZE = 16

Items = list[tuple[Path, int]]


def _setting(default: Any, help: str, panel: str = "Optimisation") -> Any:
    return field(default=default, metadata={"help": help, "panel": panel})


@dataclass
class ProbeConfig:
    """Probe settings; each field is a flag of ``mlx-aim probe`` (``batch_size``: --batch-size).

    The defaults suit small datasets (the paper trains 100 epochs on ImageNet).
    """

    head: str = _setting(
        "attentive",
        "attentive (the head of the released AIMv1 models) or linear (token-mean baseline).",
        "Probe",
    )
    layers: str = _setting(
        "last",
        "Blocks whose outputs are averaged: last (the last 6), best (released AIMv1 only) or "
        "i,j,k (negative counts from the end).",
        "Probe",
    )
    epochs: int = _setting(20, "Training epochs.")
    batch_size: int | None = _setting(
        None,
        f"Images per step. Default: {DEFAULT_BATCH_SIZE}, or a tenth of the training images "
        f"(at least {SMALL_SET_BATCH_SIZE}) when that is smaller, so that a small set still gets "
        "10 steps an epoch.",
    )
    lr: float = _setting(1e-3, "Peak learning rate (AdamW).")
    min_lr: float = _setting(1e-5, "Learning rate at the end of the cosine decay.")
    weight_decay: float = _setting(0.05, "AdamW weight decay.")
    warmup_epochs: float = _setting(1.0, "Linear warm-up length in epochs.")
    grad_clip: float = _setting(
        3.0, "Clip the global gradient norm to this value (0: no clipping)."
    )
    seed: int = _setting(0, "Seed of the head's initialisation, the batches and --val-fraction.")
    augment: bool = _setting(
        False, "Random resized crops and flips; runs the trunk every step.", "Data"
    )
    val_fraction: float = _setting(
        0.2, "Held-out fraction when the data has no val/ folder.", "Data"
    )
    workers: int = _setting(2, "Image decoding threads.", "Data")
    cache: bool = _setting(True, "Cache the trunk's features on disk (float16).", "Data")
    cache_dir: str | None = _setting(
        None,
        "Feature cache (default: $MLX_AIM_CACHE/features or ~/.cache/mlx-aim/features).",
        "Data",
    )

    def validate(self) -> ProbeConfig:
        """Raise ``InputError`` naming the first invalid setting (by its flag); return ``self``."""
        if self.head not in HEADS:
            raise InputError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.epochs < 1:
            raise InputError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 2:
            raise InputError(
                f"--batch-size must be >= 2 (BatchNorm needs two images), got {self.batch_size}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        for name in ("min_lr", "weight_decay", "warmup_epochs", "grad_clip", "workers"):
            if not getattr(self, name) >= 0:
                raise InputError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise InputError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        return self

    @property
    def forward_batch_size(self) -> int:
        """Images per forward pass of the trunk (feature extraction, evaluation)."""
        return self.batch_size or DEFAULT_BATCH_SIZE

    def step_batch_size(self, num_train: int) -> int:
        """Images per training step for ``num_train`` training images."""
        if self.batch_size is None:
            small_set = max(SMALL_SET_BATCH_SIZE, num_train // 10)
            return min(DEFAULT_BATCH_SIZE, small_set, num_train)
        return min(self.batch_size, num_train)


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class ProbeData:
    """A labelled image folder split into train and validation items."""

    train: Items
    val: Items
    classes: list[str]
    errors: list[ImageError] = field(default_factory=list)
    root: str = ""


@dataclass
class Hooks:
    """Callbacks a front end (the CLI) passes in: log lines, unreadable files, progress bars."""

    log: Callable[[str], None] = lambda message: None
    on_error: Callable[[ImageError], None] | None = None
    progress: Callable[[str, int], Callable[[int], None]] = lambda desc, total: lambda n: None


@dataclass
class ProbeResult:
    """The trained classifier (trunk + head), its class names and the JSON report."""

    model: nn.Module
    classes: list[str]
    report: dict[str, Any]


def load_dataset(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> ProbeData:
    """Class folders with ``train/`` and ``val/`` splits, or one folder split by ``val_fraction``."""
    try:
        found = find_labeled_images(root)
    except ValueError as e:
        raise InputError(str(e)) from None
    train, val = found.train, found.val
    if val is None:
        train, val = split_paths(found.train, val_fraction, seed)
    return ProbeData(train, val, found.classes, list(found.errors), str(root))


def check_classes(data: ProbeData) -> None:
    """Refuse data with fewer than two classes (a probe could not learn anything from it)."""
    if len(data.classes) >= 2:
        return
    root = Path(data.root)
    found = f"one class folder ({data.classes[0]})" if data.classes else "no class folder"
    raise InputError(
        f"{root}: {found}, a probe needs two or more: {root}/<class>/<images>, or "
        f"{root}/train/<class>/<images> with {root}/val/<class>/<images> (images directly in "
        "the folder belong to no class)"
    )


def known_best_layers(args: Any, name: str | None = None) -> tuple[int, ...]:
    """The released "best" probe blocks of an AIMv1 model, by registry name or architecture."""
    entry = REGISTRY.get(name) if name else None
    if entry is not None and entry.checkpoint is not None:
        return entry.checkpoint.best_layers
    keys = ("model_type", "embed_dim", "num_blocks", "num_heads", "patch_size")
    for entry in REGISTRY.values():
        if entry.checkpoint and entry.checkpoint.best_layers:
            if all(entry.config[k] == getattr(args, k) for k in keys):
                return entry.checkpoint.best_layers
    return ()


def resolve_layers(spec: str | Sequence[int], args: Any, name: str | None = None) -> list[int]:
    """Block indices for ``last`` (the last six), ``best`` (released AIMv1 only) or ``i,j,k``.

    Negative indices count from the end.
    """
    n = args.num_blocks
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "last":
            return last_six_blocks(n)
        if spec == "best":
            best = known_best_layers(args, name)
            if not best:
                released = ", ".join(
                    k for k, e in REGISTRY.items() if e.checkpoint and e.checkpoint.best_layers
                )
                raise InputError(
                    f"--layers best is only defined for the released AIMv1 models ({released})"
                )
            return list(best)
        try:
            spec = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise InputError(
                f"--layers must be last, best or block indices like 3,4,5; got {spec!r}"
            ) from None
    layers = []
    for i in spec:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise InputError(f"--layers: block {i} does not exist, the trunk has blocks 0..{n - 1}")
        if j not in layers:
            layers.append(j)
    if not layers:
        raise InputError("--layers names no block")
    return layers


def random_model(source: str, seed: int = 0) -> nn.Module:
    """A randomly initialised trunk with the architecture of a registry name or model directory."""
    if source in REGISTRY:
        config, prep = dict(REGISTRY[source].config), REGISTRY[source].preprocessing
    else:
        config = read_config(source)
        prep = read_preprocessing(source, config)
    if config["model_type"] == "aim_pretrain":
        config = config["encoder"]
    config = {
        k: v for k, v in config.items() if k not in ("num_classes", "probe_layers", "classifier")
    }
    mx.random.seed(seed)
    model = build_model(config)
    model.eval()
    mx.eval(model.parameters())
    model.preprocessing = prep or default_preprocessing(config)
    return model


def probe_preprocessing(model: nn.Module) -> Preprocessing:
    """The model's evaluation preprocessing at a fixed size (native models: square resize+crop)."""
    args = vision_model(model).args
    prep = getattr(model, "preprocessing", None) or default_preprocessing(args.to_dict())
    if prep.native:
        size = args.image_size
        prep = Preprocessing(size, size, prep.mean, prep.std, prep.interpolation, native=False)
    return prep


def _eval_transform(model: nn.Module) -> Preprocessing:
    return crop_transform(probe_preprocessing(model), vision_model(model).args.model_type)


def _param_dtype(model: nn.Module) -> mx.Dtype:
    return vision_model(model).preprocessor.patchifier.proj.weight.dtype


def _feature_fn(trunk: nn.Module, layers: list[int]) -> Callable[[mx.array], mx.array]:
    dtype = _param_dtype(trunk)

    def features(images: mx.array) -> mx.array:
        return layer_average(trunk, images.astype(dtype), layers).astype(mx.float32)

    return features


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 5) -> tuple[float, float]:
    """(top-1, top-k) accuracy in [0, 1]; k is capped at the number of classes."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean(top[:, 0] == labels)), float(np.mean((top == labels[:, None]).any(1)))


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def head_logits(runner: BatchRunner, features: FeatureSet) -> np.ndarray:
    """Logits over a feature set, in order (``runner`` wraps the head in eval mode)."""
    out = [
        np.asarray(runner(np.asarray(features.features[s], np.float32)))
        for s in _batches(len(features), runner.batch_size)
    ]
    return np.concatenate(out)


def compute_features(
    model: nn.Module,
    items: Items,
    layers: list[int],
    config: ProbeConfig,
    hooks: Hooks,
    description: str,
) -> tuple[FeatureSet, bool]:
    """Features of ``items`` (frozen trunk, eval preprocessing) and whether the cache had them."""
    trunk = vision_model(model)
    transform = _eval_transform(model)
    runner = BatchRunner(_feature_fn(trunk, layers), config.forward_batch_size, trunk.state)

    def compute(out_file: Path | None) -> FeatureSet:
        return extract_features(
            runner,
            items,
            transform,
            out_file=out_file,
            dtype=np.float16 if out_file is not None else np.float32,
            num_workers=config.workers,
            on_error=hooks.on_error,
            progress=hooks.progress(description, len(items)),
        )

    if not config.cache:
        return compute(None), False
    cache = FeatureCache(config.cache_dir)
    key = cache.key(
        "probe", model_fingerprint(trunk), items_fingerprint(items), layers, repr(transform)
    )
    return cache.get_or_compute(key, compute)


def _classifier_config(trunk: nn.Module, num_classes: int, layers: list[int], head: str) -> dict:
    config = trunk.args.to_dict()
    config.update(num_classes=num_classes, probe_layers=list(layers), classifier=head)
    return config


def train_probe(
    model: nn.Module,
    data: ProbeData,
    config: ProbeConfig | None = None,
    *,
    model_name: str | None = None,
    random_init: bool = False,
    hooks: Hooks | None = None,
) -> ProbeResult:
    """Train a probe head on ``model``'s frozen trunk; validate every epoch (top-1 / top-5).

    ``model_name`` and ``random_init`` (the trunk is a random baseline) go into the report.
    """
    config = (config or ProbeConfig()).validate()
    check_classes(data)
    hooks = hooks or Hooks()
    trunk = vision_model(model)
    trunk.eval()
    layers = resolve_layers(config.layers, trunk.args, model_name)
    started = time.perf_counter()

    val, val_hit = (None, False)
    if data.val:
        val, val_hit = compute_features(model, data.val, layers, config, hooks, "val features")
    # also with --augment: the exact BatchNorm statistics are taken over these features
    train, train_hit = compute_features(model, data.train, layers, config, hooks, "train features")
    if len(train) < 2:
        raise InputError(f"{data.root}: fewer than two readable training images")
    readable = sorted({data.classes[i] for i in np.unique(train.labels)})
    if len(readable) < 2:
        raise InputError(
            f"{data.root}: only the class {', '.join(readable)} has readable training images "
            "after skipping the unreadable ones; a probe needs two or more classes"
        )
    feature_seconds = time.perf_counter() - started

    mx.random.seed(config.seed)
    classifier_config = _classifier_config(trunk, len(data.classes), layers, config.head)
    head = build_classifier(build_model_args(classifier_config))
    mx.eval(head.parameters())
    epochs = _train_head(model, head, layers, data, train, val, config, hooks)

    scored = [e for e in epochs if e.get("top1") is not None]
    best = max(scored, key=lambda e: e["top1"]) if scored else None
    report = {
        "model": model_name,
        "random_init": random_init,
        "data": data.root,
        "classes": data.classes,
        "head": config.head,
        "layers": layers,
        "batch_size": config.step_batch_size(len(train)),
        "config": {k: v for k, v in asdict(config).items() if k != "layers"},
        "num_train": len(train),
        "num_val": len(val) if val is not None else 0,
        "feature_cache": {"train": train_hit, "val": val_hit} if config.cache else None,
        "unreadable": sorted(
            {str(e) for e in data.errors} | set(train.errors) | set(val.errors if val else [])
        ),
        "epochs": epochs,
        "final": {k: epochs[-1].get(k) for k in ("top1", "top5", "loss")},
        "best": {"epoch": best["epoch"], "top1": best["top1"]} if best else None,
        "seconds": {
            "features": round(feature_seconds, 3),
            "total": round(time.perf_counter() - started, 3),
        },
    }
    return ProbeResult(_classifier(model, head, classifier_config), data.classes, report)


def _classifier(model: nn.Module, head: nn.Module, config: dict[str, Any]) -> nn.Module:
    """The trunk of ``model`` with ``head`` as one classifier model, in eval mode."""
    classifier = build_model(config)
    weights = {
        k: v for k, v in tree_flatten(vision_model(model).parameters()) if not k.startswith("head.")
    }
    weights.update({f"head.{k}": v for k, v in tree_flatten(head.parameters())})
    apply_weights(classifier, weights)
    classifier.eval()
    classifier.preprocessing = probe_preprocessing(model)
    return classifier


def _batch_norm_inputs(head: nn.Module, features: np.ndarray) -> np.ndarray:
    """What the head's BatchNorm normalizes, as rows (count, D): the token-mean of the linear head,
    every token of the attentive one."""
    x = np.asarray(features, np.float64)
    if isinstance(head, LinearClassifier):
        return x.mean(axis=1)
    return x.reshape(-1, x.shape[-1])


def batch_norm_statistics(
    head: nn.Module, features: FeatureSet, chunk: int = 32
) -> tuple[mx.array, mx.array] | None:
    """The exact mean and (unbiased) variance of the head's BatchNorm input over ``features``.

    BatchNorm's running averages depend on how many steps the head took: with one step per epoch
    (a small dataset) they are still far from the data's after 20 epochs. Evaluation uses these
    instead. None when the head has no BatchNorm.
    """
    if "bn" not in head:
        return None
    count, mean, m2 = 0, 0.0, 0.0  # merged chunk by chunk (Chan et al.), in float64
    for rows in _batches(len(features), chunk):
        x = _batch_norm_inputs(head, features.features[rows])
        n, x_mean = len(x), x.mean(axis=0)
        delta = x_mean - mean
        m2 = m2 + ((x - x_mean) ** 2).sum(axis=0) + delta**2 * count * n / (count + n)
        mean, count = mean + delta * n / (count + n), count + n
    return mx.array(mean, mx.float32), mx.array(m2 / max(count - 1, 1), mx.float32)


def _use_statistics(head: nn.Module, statistics: tuple[mx.array, mx.array] | None) -> None:
    if statistics is not None:
        head.bn.running_mean, head.bn.running_var = statistics


def _feature_batches(
    train: FeatureSet, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of shuffled full batches of cached features (the rest is left out)."""
    order = rng.permutation(len(train))
    for s in range(len(train) // batch_size):
        idx = np.sort(order[s * batch_size : (s + 1) * batch_size])
        yield np.asarray(train.features[idx], np.float32), train.labels[idx]


def _augmented_batches(
    model: nn.Module, data: ProbeData, batch_size: int, config: ProbeConfig
) -> Callable[[int], ImageLoader]:
    """``epoch -> loader`` of randomly cropped and flipped training images."""
    prep = probe_preprocessing(model)
    augment = TrainTransform(prep.crop, prep.mean, prep.std, scale=(0.08, 1.0))

    def loader(epoch: int) -> ImageLoader:
        return ImageLoader(
            data.train,
            augment,
            batch_size,
            seed=config.seed,
            epochs=epoch + 1,
            start={"epoch": epoch, "cursor": 0},
            num_workers=config.workers,  # unreadable files: named once, by the feature pass
        )

    return loader


def _compiled_step(
    head: nn.Module,
    optimizer: optim.Optimizer,
    features: Callable[[mx.array], mx.array] | None,
    trunk_state: Any,
    grad_clip: float,
) -> Callable[[mx.array, mx.array], mx.array]:
    """One optimizer step of the head; ``features`` runs the frozen trunk on images (--augment)."""

    def loss_fn(head: nn.Module, x: mx.array, y: mx.array) -> mx.array:
        return nn.losses.cross_entropy(head(x), y, reduction="mean")

    loss_and_grad = nn.value_and_grad(head, loss_fn)
    state = [head.state, optimizer.state]

    @partial(mx.compile, inputs=[trunk_state, *state], outputs=state)
    def step(inputs: mx.array, y: mx.array) -> mx.array:
        x = inputs if features is None else mx.stop_gradient(features(inputs))
        loss, grads = loss_and_grad(head, x, y)
        if grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(head, grads)
        return loss

    return step


def _train_head(
    model: nn.Module,
    head: nn.Module,
    layers: list[int],
    data: ProbeData,
    train: FeatureSet,
    val: FeatureSet | None,
    config: ProbeConfig,
    hooks: Hooks,
) -> list[dict[str, Any]]:
    """The training loop: on cached ``train`` features, or on augmented images (--augment).

    Before every evaluation the BatchNorm statistics are set to their exact values over ``train``.
    """
    trunk = vision_model(model)
    batch_size = config.step_batch_size(len(train))
    loader = _augmented_batches(model, data, batch_size, config) if config.augment else None
    steps_per_epoch = loader(0).batches_per_epoch if loader else len(train) // batch_size
    total = config.epochs * steps_per_epoch
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)
    schedule = warmup_cosine(config.lr, warmup, total, config.min_lr)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    optimizer.init(head.trainable_parameters())
    features = _feature_fn(trunk, layers) if config.augment else None
    step = _compiled_step(head, optimizer, features, trunk.state, config.grad_clip)
    statistics = batch_norm_statistics(head, train)
    evaluate = BatchRunner(lambda x: head(x), config.forward_batch_size, state=head.state)
    rng = np.random.default_rng(config.seed)
    history = []
    for epoch in range(config.epochs):
        start = time.perf_counter()
        if loader is None:
            batches = _feature_batches(train, batch_size, rng)
        else:
            batches = ((b["images"], b["labels"]) for b in loader(epoch))
        advance = hooks.progress(f"epoch {epoch + 1}/{config.epochs}", steps_per_epoch)
        head.train()
        losses = []
        for x, y in batches:
            loss = step(mx.array(x), mx.array(y))
            mx.eval(loss, head.state, optimizer.state)
            losses.append(loss.item())
            advance(1)
        head.eval()
        _use_statistics(head, statistics)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "lr": float(schedule(mx.array(optimizer.step))),
        }
        if val is not None and len(val):
            top1, top5 = topk_accuracy(head_logits(evaluate, val), val.labels)
            record.update(top1=top1, top5=top5)
        record["seconds"] = round(time.perf_counter() - start, 3)
        history.append(record)
        hooks.log(format_epoch(record, config.epochs))
    return history


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """One log line per epoch."""
    line = f"epoch {record['epoch']:>3}/{epochs}  loss {record['loss']:.4f}"
    if record.get("top1") is not None:
        line += f"  val top-1 {100 * record['top1']:.2f}%  top-5 {100 * record['top5']:.2f}%"
    return line + f"  ({record['seconds']:.1f} s)"


def save_probe(result: ProbeResult, output: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the classifier (config, weights, preprocessing), ``classes.json`` and the report.

    The directory appears complete or not at all; ``mlx_aim.load(output)`` returns the classifier.
    An existing ``output`` needs ``overwrite``.
    """
    output = Path(output)
    with atomic_directory(output, overwrite=overwrite) as staging:
        save_model(result.model, staging, preprocessing=result.model.preprocessing, overwrite=True)
        write_json(staging / CLASSES_FILE, result.classes)
        write_json(staging / REPORT_FILE, result.report)
    return output


# --------------------------------------------------------------------------------------------
# evaluating a classifier that already has a head


def read_classes(source: str | os.PathLike) -> list[str] | None:
    """Class names saved beside a classifier (``classes.json``), if any."""
    file = Path(source).expanduser() / CLASSES_FILE
    if not file.is_file():
        return None
    classes = read_json(file)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise InputError(f"{file}: expected a JSON list of class names")
    return classes


def class_index(
    data_classes: list[str], model_classes: list[str] | None, num_classes: int
) -> np.ndarray:
    """Map data labels to model outputs: by name with ``classes.json``, else folder order."""
    if model_classes is None:
        if len(data_classes) > num_classes:
            raise InputError(
                f"the data's classes ({len(data_classes)}) outnumber the model's outputs "
                f"({num_classes})"
            )
        return np.arange(len(data_classes))
    missing = [c for c in data_classes if c not in model_classes]
    if missing:
        raise InputError(
            f"class {missing[0]!r} of the data is not one of the model's classes "
            f"({', '.join(model_classes[:5])}{', ...' if len(model_classes) > 5 else ''})"
        )
    return np.array([model_classes.index(c) for c in data_classes])


def evaluate_classifier(
    model: nn.Module,
    items: Items,
    *,
    classes: list[str],
    model_classes: list[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    hooks: Hooks | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 of a model with a classifier head on labelled images, with predictions."""
    hooks = hooks or Hooks()
    if "head" not in model:
        raise InputError(
            "the model has no classifier head (num_classes is 0): train one with `mlx-aim probe`"
        )
    mapping = class_index(classes, model_classes, model.args.num_classes)
    dtype = _param_dtype(model)
    runner = BatchRunner(
        lambda x: model(x.astype(dtype)).astype(mx.float32), batch_size, model.state
    )
    errors: list[str] = []

    def skip(error: ImageError) -> None:
        errors.append(str(error))
        if hooks.on_error is not None:
            hooks.on_error(error)

    loader = ImageLoader.in_order(
        items, _eval_transform(model), batch_size, num_workers=num_workers, on_error=skip
    )
    advance = hooks.progress("evaluating", len(items))
    logits, labels, paths = [], [], []
    for batch in loader:
        logits.append(np.asarray(runner(batch["images"])))
        labels.append(mapping[batch["labels"]])
        paths.extend(str(p) for p in batch["paths"])
        advance(len(batch["paths"]))
    if not paths:
        raise InputError("none of the images to evaluate could be read")
    logits_np = np.concatenate(logits)
    labels_np = np.concatenate(labels)
    top1, top5 = topk_accuracy(logits_np, labels_np)
    top = np.argsort(-logits_np, axis=1, kind="stable")[:, : min(5, logits_np.shape[1])]
    names = model_classes
    predictions = [
        {
            "path": path,
            "label": int(label),
            "prediction": int(pred[0]),
            "top5": [int(i) for i in pred],
            **({"class": names[int(pred[0])]} if names else {}),
        }
        for path, label, pred in zip(paths, labels_np, top, strict=True)
    ]
    return {
        "top1": top1,
        "top5": top5,
        "count": len(paths),
        "unreadable": errors,
        "predictions": predictions,
    }


def save_evaluation(
    result: dict[str, Any],
    output: str | os.PathLike,
    *,
    model: str,
    data: str,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``predictions.jsonl`` (one object per image) and ``eval_report.json`` into ``output``.

    Both appear together or not at all; existing ones need ``overwrite``.
    """
    files = eval_files(output)
    for file in files:
        check_destination(file, overwrite=overwrite)
    report = {"model": model, "data": data}
    report.update((k, v) for k, v in result.items() if k != "predictions")
    with atomic_paths(*files) as (predictions, report_file):
        predictions.write_text("".join(json.dumps(row) + "\n" for row in result["predictions"]))
        report_file.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return files


def eval_files(output: str | os.PathLike) -> list[Path]:
    """The files ``save_evaluation`` writes into ``output``, the report last."""
    return [Path(output) / PREDICTIONS_FILE, Path(output) / EVAL_REPORT_FILE]
