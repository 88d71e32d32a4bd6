"""Attentive and linear probes on frozen AIM trunks (the library side of ``mlx-aim probe``).

The attentive probe is the head of the released AIMv1 checkpoints: BatchNorm without affine on the
mean of the chosen raw block outputs, one learned query with bias-free k/v projections (heads =
trunk heads) and a bias-free linear layer. ``head="linear"`` trains BatchNorm + linear on the
token-mean of the same features, as a baseline. Both train with AdamW, linear warm-up and cosine
decay. Without augmentation the trunk's features are computed once and cached as float16 on disk
(``FeatureCache``), so later epochs and reruns only run the head.

Example::

    model = mlx_aim.load("runs/aim-nano")                 # any trunk mlx_aim.load accepts
    data = load_dataset(builtin_dataset("digits"))
    result = train_probe(model, data, ProbeConfig(epochs=20))
    save_probe(result, "probes/digits")                   # mlx_aim.load() gives the classifier
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .data import ImageLoader, find_labeled_images, split_paths
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
from .images import ImageError
from .models import build_model, build_model_args
from .models.base import last_six_blocks
from .models.layers import build_classifier
from .registry import REGISTRY, Preprocessing, default_preprocessing
from .transforms import Preprocess, TrainTransform
from .weights import apply_weights, read_config, read_preprocessing, save_model, write_json

CLASSES_FILE = "classes.json"
REPORT_FILE = "probe_report.json"
PREDICTIONS_FILE = "predictions.jsonl"
EVAL_REPORT_FILE = "eval_report.json"
HEADS = ("attentive", "linear")

Items = list[tuple[Path, int]]


@dataclass
class ProbeConfig:
    """Probe settings (defaults suit small datasets; the paper trains 100 epochs on ImageNet)."""

    head: str = "attentive"
    layers: str | Sequence[int] = "last"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 3.0
    augment: bool = False
    val_fraction: float = 0.2
    seed: int = 0
    cache: bool = True
    cache_dir: str | None = None
    num_workers: int = 2

    def validate(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("need epochs >= 1 and a batch size >= 2")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("learning rates, weight decay and warm-up must be non-negative")


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
    found = find_labeled_images(root)
    train, val = found.train, found.val
    if val is None:
        train, val = split_paths(found.train, val_fraction, seed)
    return ProbeData(train, val, found.classes, list(found.errors), str(root))


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
                raise ValueError(
                    f"--layers best is only defined for the released AIMv1 models ({released})"
                )
            return list(best)
        try:
            spec = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"--layers must be last, best or block indices like 3,4,5; got {spec!r}"
            ) from None
    layers = []
    for i in spec:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(f"block {i} does not exist: the trunk has blocks 0..{n - 1}")
        if j not in layers:
            layers.append(j)
    if not layers:
        raise ValueError("--layers names no block")
    return layers


def random_model(source: str, seed: int = 0) -> nn.Module:
    """A randomly initialised trunk with the architecture of a registry name or model directory."""
    if source in REGISTRY:
        config, prep = dict(REGISTRY[source].config), REGISTRY[source].preprocessing
    else:
        config, prep = read_config(source), read_preprocessing(source)
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


def _eval_transform(model: nn.Module) -> Preprocess:
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
    runner = BatchRunner(_feature_fn(trunk, layers), config.batch_size, state=trunk.state)

    def compute(out_file: Path | None) -> FeatureSet:
        return extract_features(
            runner,
            items,
            transform,
            out_file=out_file,
            dtype=np.float16 if out_file is not None else np.float32,
            num_workers=config.num_workers,
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


def _schedule(config: ProbeConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
    cosine = optim.cosine_decay(config.lr, max(total - warmup, 1), end=config.min_lr)
    if warmup <= 0:
        return cosine
    return optim.join_schedules(
        [optim.linear_schedule(config.lr / warmup, config.lr, warmup), cosine], [warmup]
    )


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
    hooks: Hooks | None = None,
) -> ProbeResult:
    """Train a probe head on ``model``'s frozen trunk; validate every epoch (top-1 / top-5)."""
    config = config or ProbeConfig()
    config.validate()
    hooks = hooks or Hooks()
    trunk = vision_model(model)
    trunk.eval()
    layers = resolve_layers(config.layers, trunk.args, model_name)
    num_classes = len(data.classes)
    started = time.perf_counter()

    val, val_hit = (
        compute_features(model, data.val, layers, config, hooks, "val features")
        if data.val
        else (None, False)
    )
    train, train_hit = (None, False)
    if not config.augment:
        train, train_hit = compute_features(
            model, data.train, layers, config, hooks, "train features"
        )
        if len(train) < 2:
            raise ValueError(f"{data.root}: fewer than two readable training images")
    feature_seconds = time.perf_counter() - started

    mx.random.seed(config.seed)
    head_args = build_model_args(_classifier_config(trunk, num_classes, layers, config.head))
    head = build_classifier(head_args)
    mx.eval(head.parameters())

    epochs = _train_head(model, head, layers, data, train, val, config, hooks)

    classifier = build_model(_classifier_config(trunk, num_classes, layers, config.head))
    weights = {k: v for k, v in tree_flatten(trunk.parameters()) if not k.startswith("head.")}
    weights.update({f"head.{k}": v for k, v in tree_flatten(head.parameters())})
    apply_weights(classifier, weights)
    classifier.eval()
    classifier.preprocessing = probe_preprocessing(model)

    scored = [e for e in epochs if e.get("top1") is not None]
    best = max(scored, key=lambda e: e["top1"]) if scored else None
    report = {
        "model": model_name,
        "data": data.root,
        "classes": data.classes,
        "head": config.head,
        "layers": layers,
        "config": {k: v for k, v in asdict(config).items() if k != "layers"},
        "num_train": len(train) if train is not None else len(data.train),
        "num_val": len(val) if val is not None else 0,
        "feature_cache": {"train": train_hit, "val": val_hit} if config.cache else None,
        "unreadable": sorted(
            {str(e) for e in data.errors}
            | set(train.errors if train is not None else [])
            | set(val.errors if val is not None else [])
        ),
        "epochs": epochs,
        "final": {k: epochs[-1].get(k) for k in ("top1", "top5", "loss")},
        "best": {"epoch": best["epoch"], "top1": best["top1"]} if best else None,
        "seconds": {
            "features": round(feature_seconds, 3),
            "total": round(time.perf_counter() - started, 3),
        },
    }
    return ProbeResult(classifier, data.classes, report)


def _train_head(
    model: nn.Module,
    head: nn.Module,
    layers: list[int],
    data: ProbeData,
    train: FeatureSet | None,
    val: FeatureSet | None,
    config: ProbeConfig,
    hooks: Hooks,
) -> list[dict[str, Any]]:
    """The training loop; ``train`` is None with augmentation (the trunk runs every step)."""
    trunk = vision_model(model)
    if train is not None:
        batch_size = min(config.batch_size, len(train))
        steps_per_epoch = len(train) // batch_size
    else:
        size = probe_preprocessing(model).crop
        prep = probe_preprocessing(model)
        augment = TrainTransform(size, prep.mean, prep.std, scale=(0.08, 1.0))
        batch_size = config.batch_size

        def loader(epoch: int) -> ImageLoader:
            return ImageLoader(
                data.train,
                augment,
                batch_size,
                seed=config.seed,
                epochs=epoch + 1,
                start={"epoch": epoch, "cursor": 0},
                num_workers=config.num_workers,
                on_error=hooks.on_error,
            )

        steps_per_epoch = loader(0).batches_per_epoch

    schedule = _schedule(config, steps_per_epoch)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    optimizer.init(head.trainable_parameters())

    def loss_fn(head: nn.Module, x: mx.array, y: mx.array) -> mx.array:
        return nn.losses.cross_entropy(head(x), y, reduction="mean")

    loss_and_grad = nn.value_and_grad(head, loss_fn)
    features = _feature_fn(trunk, layers)
    state = [head.state, optimizer.state]

    @partial(mx.compile, inputs=[trunk.state, *state], outputs=state)
    def step(inputs: mx.array, y: mx.array) -> mx.array:
        x = inputs if train is not None else mx.stop_gradient(features(inputs))
        loss, grads = loss_and_grad(head, x, y)
        grads, _ = optim.clip_grad_norm(grads, config.grad_clip)
        optimizer.update(head, grads)
        return loss

    def batches(epoch: int, rng: np.random.Generator):
        if train is None:
            for batch in loader(epoch):
                yield batch["images"], batch["labels"]
            return
        order = rng.permutation(len(train))
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * batch_size : (s + 1) * batch_size])
            yield np.asarray(train.features[idx], np.float32), train.labels[idx]

    evaluate = BatchRunner(lambda x: head(x), config.batch_size, state=head.state)
    rng = np.random.default_rng(config.seed)
    history = []
    for epoch in range(config.epochs):
        start = time.perf_counter()
        head.train()
        advance = hooks.progress(f"epoch {epoch + 1}/{config.epochs}", steps_per_epoch)
        losses = []
        for x, y in batches(epoch, rng):
            loss = step(mx.array(x), mx.array(y))
            mx.eval(loss, state)
            losses.append(loss.item())
            advance(1)
        head.eval()
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
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists (use --force to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:
        target = save_model(
            result.model, staging / "model", preprocessing=result.model.preprocessing
        )
        write_json(target / CLASSES_FILE, result.classes)
        write_json(target / REPORT_FILE, result.report)
        if output.exists():
            old = staging / "old"
            os.replace(output, old)
        os.replace(target, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


# --------------------------------------------------------------------------------------------
# evaluating a classifier that already has a head


def read_classes(source: str | os.PathLike) -> list[str] | None:
    """Class names saved beside a classifier (``classes.json``), if any."""
    file = Path(source).expanduser() / CLASSES_FILE
    if not file.is_file():
        return None
    classes = json.loads(file.read_text())
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{file}: expected a JSON list of class names")
    return classes


def class_index(
    data_classes: list[str], model_classes: list[str] | None, num_classes: int
) -> np.ndarray:
    """Map data labels to model outputs: by name with ``classes.json``, else folder order."""
    if model_classes is None:
        if len(data_classes) > num_classes:
            raise ValueError(
                f"the data has {len(data_classes)} classes but the model only {num_classes} outputs"
            )
        return np.arange(len(data_classes))
    missing = [c for c in data_classes if c not in model_classes]
    if missing:
        raise ValueError(
            f"class {missing[0]!r} of the data is not one of the model's {len(model_classes)} "
            f"classes ({', '.join(model_classes[:5])}, ...)"
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
        raise ValueError(
            "the model has no classifier head (num_classes is 0); train one with probe"
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
    result: dict[str, Any], output: str | os.PathLike, *, model: str, data: str
) -> list[Path]:
    """Write ``eval_report.json`` and ``predictions.jsonl`` (one object per image) atomically."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    report = {k: v for k, v in result.items() if k != "predictions"}
    write_json(output / EVAL_REPORT_FILE, {"model": model, "data": data, **report})
    fd, tmp = tempfile.mkstemp(dir=output, prefix=f".{PREDICTIONS_FILE}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in result["predictions"])
    os.replace(tmp, output / PREDICTIONS_FILE)
    return [output / EVAL_REPORT_FILE, output / PREDICTIONS_FILE]
