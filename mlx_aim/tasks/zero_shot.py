"""Zero-shot image classification with the AIMv2 LiT model (the library side of ``mlx-aim zero-shot``).

Example::

    import mlx_aim
    from mlx_aim.tasks.zero_shot import ZeroShotClassifier

    model = mlx_aim.load("aimv2-large-patch14-224-lit")
    classifier = ZeroShotClassifier(model, ["cat", "dog", "car"])
    probs = classifier(["cat.jpg", "dog.png"])          # (2, 3), rows sum to 1
    classifier.top_k(probs, k=2)                        # [[(label, probability), ...], ...]

Each label is embedded through prompt templates (``"a photo of a {}."`` by default, or the 80 CLIP
ImageNet templates): the unit text embeddings of its prompts are averaged and renormalized, as in
CLIP's prompt ensembling. An image's probabilities are the softmax over labels of
``logit_scale * cos(image, label)``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from importlib import resources

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..data.images import ImageError
from ..errors import InputError
from ..io import write_text
from .config import TEMPLATE, ZeroShotConfig
from .embed import Embedder, EmbedResult, embed_texts
from .features import ImageLike

TEMPLATE_SETS = ("imagenet",)
PREDICTION_FORMATS = (".jsonl", ".csv")


def imagenet_templates() -> list[str]:
    """The 80 prompt templates of CLIP's ImageNet zero-shot evaluation (package data)."""
    text = resources.files("mlx_aim").joinpath("assets/imagenet_templates.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line]


def template_set(name: str) -> list[str]:
    """A named set of templates (``imagenet``)."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; known: {', '.join(TEMPLATE_SETS)}")
    return imagenet_templates()


def check_labels(labels: Sequence[str]) -> list[str]:
    """Labels stripped of surrounding space; empty or repeated labels are errors."""
    labels = [label.strip() for label in labels]
    if not labels or not all(labels):
        raise ValueError("give at least one label, and no empty one")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"labels given more than once: {', '.join(repeated)}")
    return labels


def check_templates(templates: Sequence[str]) -> list[str]:
    """Templates that each hold one ``{}`` for the label."""
    templates = list(templates)
    if not templates:
        raise ValueError("give at least one template")
    for template in templates:
        if template.count("{}") != 1 or template.replace("{}", "").count("{"):
            raise ValueError(f"template {template!r} must hold exactly one {{}} for the label")
    return templates


def label_embeddings(
    model: nn.Module, labels: Sequence[str], templates: Sequence[str], batch_size: int = 64
) -> np.ndarray:
    """Unit embeddings (L, D) of labels: mean of the unit embeddings of their prompts, renormalized."""
    labels, templates = check_labels(labels), check_templates(templates)
    prompts = [template.replace("{}", label) for label in labels for template in templates]
    vectors = embed_texts(model, prompts, normalize=True, batch_size=batch_size)
    mean = vectors.reshape(len(labels), len(templates), -1).mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    shifted = np.asarray(logits, np.float64) - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class ZeroShotClassifier:
    """Label probabilities of images from a LiT model and a fixed set of labels.

    ``classifier(images)`` takes what ``Embedder`` takes (paths, PIL images, pixel arrays, a
    preprocessed batch) and returns float64 probabilities (B, L); ``classify_files`` streams many
    files and skips unreadable ones.
    """

    def __init__(
        self,
        model: nn.Module,
        labels: Sequence[str],
        templates: Sequence[str] = (TEMPLATE,),
        *,
        batch_size: int = 16,
    ):
        self.labels = check_labels(labels)
        self.label_vectors = label_embeddings(model, self.labels, templates)
        self.embedder = Embedder(model, pool="projection", normalize=True, batch_size=batch_size)
        self.logit_scale = float(model.logit_scale)

    def probabilities(self, image_vectors: np.ndarray) -> np.ndarray:
        """Probabilities (B, L) of unit image embeddings (B, D)."""
        return softmax(self.logit_scale * np.asarray(image_vectors) @ self.label_vectors.T)

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        return self.probabilities(self.embedder(images))

    def classify_files(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        on_error: Callable[[ImageError], None] | None = None,
        progress: Callable[[int], None] | None = None,
        num_workers: int = 2,
    ) -> tuple[np.ndarray, EmbedResult]:
        """Probabilities (B, L) of the readable files, in order, with the embedding result (its
        ``paths`` and ``errors``)."""
        result = self.embedder.embed_files(
            paths, on_error=on_error, progress=progress, num_workers=num_workers
        )
        if not result.paths:
            return np.zeros((0, len(self.labels))), result
        return self.probabilities(result.embeddings), result

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable labels of each row, best first, with their probabilities."""
        k = min(k, len(self.labels))
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        return [
            [(self.labels[j], float(row[j])) for j in best]
            for row, best in zip(probs, order, strict=True)
        ]


def load_classifier(
    config: ZeroShotConfig, labels: Sequence[str], templates: Sequence[str]
) -> ZeroShotClassifier:
    """The LiT model of ``config`` as a classifier of ``labels``; a model without a text tower or
    tokenizer, or bad labels or templates, are ``InputError``s."""
    from ..checkpoints.loading import load

    net = load(config.model, dtype=getattr(mx, config.dtype))
    try:
        return ZeroShotClassifier(net, labels, templates, batch_size=config.batch_size)
    except ValueError as e:
        raise InputError(str(e)) from None


def prediction_format(path: str | os.PathLike) -> str:
    """The predictions format of ``path`` from its suffix (``.jsonl`` or ``.csv``)."""
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in PREDICTION_FORMATS:
        raise ValueError(
            f"{path}: unknown output format {suffix or '(no suffix)'!r}; use "
            f"{' or '.join(PREDICTION_FORMATS)}"
        )
    return suffix


def save_predictions(
    path: str | os.PathLike, paths: Sequence[str], top: Sequence[Sequence[tuple[str, float]]]
) -> None:
    """Write each image's top labels: ``.jsonl`` (one ``{"path", "labels", "probs"}`` object a
    line) or ``.csv`` (columns path, rank, label, probability; one row per label)."""
    fmt = prediction_format(path)
    buffer = io.StringIO()
    if fmt == ".jsonl":
        for image, best in zip(paths, top, strict=True):
            labels, probs = [label for label, _ in best], [p for _, p in best]
            buffer.write(json.dumps({"path": image, "labels": labels, "probs": probs}) + "\n")
    else:
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "rank", "label", "probability"])
        for image, best in zip(paths, top, strict=True):
            writer.writerows([image, rank, label, p] for rank, (label, p) in enumerate(best, 1))
    write_text(path, buffer.getvalue())
