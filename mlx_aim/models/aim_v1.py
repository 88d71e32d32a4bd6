"""AIMv1 (arXiv 2401.08541): LayerNorm ViT trunk with 2-D sin-cos positions and an attentive probe."""

from __future__ import annotations

from dataclasses import dataclass

from .base import BaseModelArgs, ConfigError
from .encoder import VisionEncoder
from .layers import (
    MLP,
    Block,
    SinCosPreprocessor,
    Transformer,
    build_classifier,
    layer_norm,
)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "aim_v1"
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    embed_dim: int = 1536
    num_blocks: int = 24
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 0
    probe_layers: list[int] | None = None
    head: str = "attentive"  # the probe head when num_classes > 0: attentive or linear

    def validate(self) -> None:
        super().validate()
        if self.embed_dim % 4:
            raise ConfigError(f"field 'embed_dim' ({self.embed_dim}) must be divisible by 4")


class Model(VisionEncoder):
    """AIMv1 trunk, optionally with the attentive-probe classifier of the released checkpoints.

    ``model(images)`` takes normalized NHWC images and returns logits (B, classes) when the model
    has a classifier, else the final-norm tokens (B, N, D).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        dim = args.embed_dim
        self.preprocessor = SinCosPreprocessor(args.patch_size, args.num_channels, dim, layer_norm)
        hidden = int(args.mlp_ratio * dim)
        blocks = [
            Block(dim, args.num_heads, MLP(dim, hidden), layer_norm) for _ in range(args.num_blocks)
        ]
        self.trunk = Transformer(blocks, layer_norm(dim))
        if args.num_classes:
            self.head = build_classifier(args)
