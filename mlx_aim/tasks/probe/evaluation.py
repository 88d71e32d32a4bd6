"""Evaluating probes and classifiers: top-k accuracy, class mapping, predictions and reports."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...checkpoints.registry import default_preprocessing
from ...data.images import ImageError
from ...data.loader import ImageLoader
from ...data.transforms import Preprocessing
from ...errors import InputError
from ...io import atomic_paths, check_destination, read_json
from ..features import BatchRunner, FeatureSet, crop_transform, vision_model
from .config import CLASSES_FILE, EVAL_REPORT_FILE, PREDICTIONS_FILE, Hooks, Items


def probe_preprocessing(model: nn.Module) -> Preprocessing:
    """The model's evaluation preprocessing at a fixed size (native models: square resize+crop)."""
    args = vision_model(model).args
    prep = getattr(model, "preprocessing", None) or default_preprocessing(args.to_dict())
    if prep.native:
        size = args.image_size
        prep = Preprocessing(size, size, prep.mean, prep.std, prep.interpolation, native=False)
    return prep


def eval_transform(model: nn.Module) -> Preprocessing:
    """The evaluation transform of ``model`` (its probe preprocessing, cropped)."""
    return crop_transform(probe_preprocessing(model), vision_model(model).args.model_type)


def param_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype of ``model``'s trunk weights."""
    return vision_model(model).preprocessor.patchifier.proj.weight.dtype


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 5) -> tuple[float, float]:
    """(top-1, top-k) accuracy in [0, 1]; k is capped at the number of classes."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean(top[:, 0] == labels)), float(np.mean((top == labels[:, None]).any(1)))


def index_batches(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``size`` over ``n`` items (the last may be shorter)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def head_logits(runner: BatchRunner, features: FeatureSet) -> np.ndarray:
    """Logits over a feature set, in order (``runner`` wraps the head in eval mode)."""
    out = [
        np.asarray(runner(np.asarray(features.features[s], np.float32)))
        for s in index_batches(len(features), runner.batch_size)
    ]
    return np.concatenate(out)


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
    dtype = param_dtype(model)
    runner = BatchRunner(
        lambda x: model(x.astype(dtype)).astype(mx.float32), batch_size, model.state
    )
    errors: list[str] = []

    def skip(error: ImageError) -> None:
        errors.append(str(error))
        if hooks.on_error is not None:
            hooks.on_error(error)

    loader = ImageLoader.in_order(
        items, eval_transform(model), batch_size, num_workers=num_workers, on_error=skip
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
