"""AIMv2 vision encoders (arXiv 2411.14402): RMSNorm + SwiGLU ViT, learned or sin-cos positions."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, ConfigError
from .encoder import VisionEncoder
from .layers import (
    AttentionPoolingClassifier,
    Block,
    PatchEmbed,
    SinCosPreprocessor,
    SwiGLU,
    Transformer,
    build_classifier,
    rms_norm,
)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "aim_v2"
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    embed_dim: int = 1024
    num_blocks: int = 24
    num_heads: int = 8
    mlp_hidden_dim: int = 2816
    pos_embed_type: str = "absolute"
    num_classes: int = 0
    probe_layers: list[int] | None = None
    head: str = "attentive"  # the probe head when num_classes > 0: attentive or linear
    pooling_head: bool = False  # transformers' Aimv2VisionModel(use_head=True) attention pooling

    def validate(self) -> None:
        super().validate()
        if self.pos_embed_type not in ("absolute", "sincos"):
            raise ConfigError(
                f"field 'pos_embed_type' must be 'absolute' or 'sincos', got {self.pos_embed_type!r}"
            )
        if self.pos_embed_type == "sincos" and self.embed_dim % 4:
            raise ConfigError(f"field 'embed_dim' ({self.embed_dim}) must be divisible by 4")
        if self.mlp_hidden_dim <= 0:
            raise ConfigError(f"field 'mlp_hidden_dim' must be positive, got {self.mlp_hidden_dim}")

    @property
    def native_resolution(self) -> bool:
        """Sin-cos models accept any image whose sides are whole multiples of the patch size."""
        return self.pos_embed_type == "sincos"


class AbsolutePreprocessor(nn.Module):
    """Patch embedding (conv + RMSNorm) plus a learned (1, N, D) position table."""

    def __init__(self, patch_size: int, num_channels: int, dim: int, num_patches: int):
        super().__init__()
        self.patchifier = PatchEmbed(patch_size, num_channels, dim, rms_norm)
        self.pos_embed = 0.02 * mx.random.normal((1, num_patches, dim))

    def __call__(self, images: mx.array) -> mx.array:
        tokens = self.patchifier(images)
        if tokens.shape[1] != self.pos_embed.shape[1]:
            p = self.patchifier.patch_size
            raise ValueError(
                f"this model has learned positions for {self.pos_embed.shape[1]} patches; an image "
                f"of {images.shape[1]}x{images.shape[2]} gives {tokens.shape[1]} patches of {p} px"
            )
        return tokens + self.pos_embed


class Model(VisionEncoder):
    """AIMv2 vision encoder.

    ``model(images)`` returns the final-norm tokens (B, N, D), or logits (B, classes) when a probe
    classifier was attached (``num_classes`` > 0, e.g. by ``mlx-aim probe``).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        dim = args.embed_dim
        if args.pos_embed_type == "sincos":
            self.preprocessor = SinCosPreprocessor(
                args.patch_size, args.num_channels, dim, rms_norm
            )
        else:
            self.preprocessor = AbsolutePreprocessor(
                args.patch_size, args.num_channels, dim, args.num_patches
            )
        blocks = [
            Block(dim, args.num_heads, SwiGLU(dim, args.mlp_hidden_dim), rms_norm)
            for _ in range(args.num_blocks)
        ]
        self.trunk = Transformer(blocks, rms_norm(dim))
        if args.num_classes:
            self.head = build_classifier(args)
        if args.pooling_head:
            self.pooling_head = AttentionPoolingClassifier(
                dim, dim, args.num_heads, use_batch_norm=False, linear_bias=True
            )

    def pooled(self, images: mx.array) -> mx.array:
        """The pooling head's embedding (B, D) of the final-norm tokens (``pooling_head`` models:
        transformers' ``pooler_output``)."""
        if "pooling_head" not in self:
            raise ValueError("this model has no pooling head (config field 'pooling_head')")
        return self.pooling_head(self.encode(images))
