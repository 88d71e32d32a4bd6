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

from .config import (
    CLASSES_FILE,
    EVAL_REPORT_FILE,
    HEADS,
    PREDICTIONS_FILE,
    REPORT_FILE,
    Hooks,
    ProbeConfig,
    ProbeResult,
    check_classes,
    load_dataset,
)
from .evaluation import (
    class_index,
    eval_files,
    evaluate_classifier,
    head_logits,
    probe_preprocessing,
    read_classes,
    save_evaluation,
    topk_accuracy,
)
from .training import (
    batch_norm_statistics,
    compute_features,
    format_epoch,
    random_model,
    save_probe,
    train_probe,
)

__all__ = [
    "CLASSES_FILE",
    "EVAL_REPORT_FILE",
    "HEADS",
    "PREDICTIONS_FILE",
    "REPORT_FILE",
    "Hooks",
    "ProbeConfig",
    "ProbeResult",
    "batch_norm_statistics",
    "check_classes",
    "class_index",
    "compute_features",
    "eval_files",
    "evaluate_classifier",
    "format_epoch",
    "head_logits",
    "load_dataset",
    "probe_preprocessing",
    "random_model",
    "read_classes",
    "save_evaluation",
    "save_probe",
    "topk_accuracy",
    "train_probe",
]
