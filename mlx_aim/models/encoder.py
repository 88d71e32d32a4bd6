"""What every AIM vision encoder shares: :class:`VisionEncoder` (encode, block features, probe
classifier), the mean of chosen block outputs, and the weight fix-ups applied when loading."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    from ..data.transforms import Preprocessing
    from .layers import Mask


class VisionEncoder(nn.Module):
    """What every AIM vision encoder does with its ``preprocessor`` (patches and positions),
    ``trunk`` (a ``Transformer``) and, when ``args.num_classes`` > 0, probe classifier ``head``;
    subclasses build those three.

    ``model(images)`` takes normalized NHWC images and returns logits (B, classes) when the model
    has a classifier, else the final-norm tokens (B, N, D).
    """

    preprocessing: Preprocessing | None = None  # how images are prepared (set by mlx_aim.load)

    def encode(self, images: mx.array, mask: Mask = None) -> mx.array:
        """Final-norm tokens (B, N, D)."""
        return self.trunk(self.preprocessor(images), mask)

    def extract_features(
        self, images: mx.array, mask: Mask = None, max_block_id: int = -1
    ) -> list[mx.array]:
        """Raw outputs of blocks 0..max_block_id (each (B, N, D))."""
        return self.trunk.features(self.preprocessor(images), mask, max_block_id)

    def probe_features(self, images: mx.array) -> mx.array:
        """Mean of the probe layers' raw block outputs (B, N, D); runs no later block."""
        return layer_average(self, images, self.args.feature_layers)

    def __call__(self, images: mx.array) -> mx.array:
        if "head" in self:
            return self.head(self.probe_features(images))
        return self.encode(images)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop torch-only buffers; transpose a torch-layout (D, C, p, p) patch weight; idempotent."""
        return sanitize_vision_weights(self, weights)


def layer_average(model: nn.Module, images: mx.array, layers: Sequence[int]) -> mx.array:
    """Mean of the raw outputs of blocks ``layers`` (B, N, D); later blocks are not run."""
    features = model.extract_features(images, max_block_id=max(layers))
    return mx.mean(mx.stack([features[i] for i in layers]), axis=0)


def sanitize_vision_weights(model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Shared weight fix-ups for AIM vision models; idempotent.

    The conv weight is transposed only when its shape is the torch layout of this model's own
    parameter, never by guessing.
    """
    key = "preprocessor.patchifier.proj.weight"
    weights = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    if key in weights:
        own = tuple(model.preprocessor.patchifier.proj.weight.shape)
        torch_layout = (own[0], own[3], own[1], own[2])
        if tuple(weights[key].shape) == torch_layout and torch_layout != own:
            weights[key] = weights[key].transpose(0, 2, 3, 1)
    return weights
