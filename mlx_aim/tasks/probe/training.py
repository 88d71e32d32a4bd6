"""Training a probe head on a frozen trunk: features (cached), the head's loop, saving."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ...checkpoints.registry import REGISTRY, default_preprocessing, resolve_layers
from ...checkpoints.weights import apply_weights, read_config, read_preprocessing, save_model
from ...data.loader import ImageLoader, LabeledImages
from ...data.transforms import TrainTransform
from ...errors import InputError
from ...io import atomic_directory, write_json
from ...models import build_model, build_model_args
from ...models.layers import LinearClassifier, build_classifier
from ...train.optim import warmup_cosine
from ..features import (
    BatchRunner,
    FeatureCache,
    FeatureSet,
    compute_feature_set,
    items_fingerprint,
    layer_average,
    model_fingerprint,
    vision_model,
)
from .config import (
    CLASSES_FILE,
    REPORT_FILE,
    Hooks,
    Items,
    ProbeConfig,
    ProbeResult,
    check_classes,
)
from .evaluation import (
    eval_transform,
    head_logits,
    index_batches,
    param_dtype,
    probe_preprocessing,
    topk_accuracy,
)


def random_model(source: str, seed: int = 0) -> nn.Module:
    """A randomly initialised trunk with the architecture of a registry name or model directory."""
    if source in REGISTRY:
        config, prep = dict(REGISTRY[source].config), REGISTRY[source].preprocessing
    else:
        config = read_config(source)
        prep = read_preprocessing(source, config)
    if config["model_type"] == "aim_pretrain":
        config = config["encoder"]
    config = {k: v for k, v in config.items() if k not in ("num_classes", "probe_layers", "head")}
    mx.random.seed(seed)
    model = build_model(config)
    model.eval()
    mx.eval(model.parameters())
    model.preprocessing = prep or default_preprocessing(config)
    return model


def _feature_fn(trunk: nn.Module, layers: list[int]) -> Callable[[mx.array], mx.array]:
    dtype = param_dtype(trunk)

    def features(images: mx.array) -> mx.array:
        return layer_average(trunk, images.astype(dtype), layers).astype(mx.float32)

    return features


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
    transform = eval_transform(model)
    runner = BatchRunner(_feature_fn(trunk, layers), config.forward_batch_size, trunk.state)

    def compute(out_file: Path | None) -> FeatureSet:
        return compute_feature_set(
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
    config.update(num_classes=num_classes, probe_layers=list(layers), head=head)
    return config


def train_probe(
    model: nn.Module,
    data: LabeledImages,
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
    for rows in index_batches(len(features), chunk):
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
    model: nn.Module, data: LabeledImages, batch_size: int, config: ProbeConfig
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
    data: LabeledImages,
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
