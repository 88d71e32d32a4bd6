"""AIMv2 LiT: the AIMv2 image encoder and a causal text tower in a shared embedding space.

The layout follows apple/ml-aim's ``AIMv2LiT`` (keys ``image_encoder.*``, ``text_encoder.*``,
``image_projector``, ``text_projector``, ``log_logit_scale``):

- image side: an AIMv2 trunk, then an attention-pooling head (one learned query, bias-free k and v,
  a linear layer with bias) on its final-norm tokens;
- text side: token + learned position embeddings, causal pre-norm RMSNorm/SwiGLU blocks, a final
  RMSNorm, and the token at the first end-of-text id as the sentence feature;
- bias-free projections of both into ``projection_dim``; the logits are cosine similarities times
  ``exp(log_logit_scale)``, the log-scale clamped to ``[0, log(max_logit_scale)]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import aim_v2
from .base import BaseModelArgs, ConfigError
from .encoder import sanitize_vision_weights
from .layers import (
    AttentionPoolingClassifier,
    Block,
    SwiGLU,
    Transformer,
    rms_norm,
)

# The image tower of the released aimv2-large-patch14-224-lit.
LARGE_224 = {
    "model_type": "aim_v2",
    "image_size": 224,
    "patch_size": 14,
    "embed_dim": 1024,
    "num_blocks": 24,
    "num_heads": 8,
    "mlp_hidden_dim": 2816,
    "pos_embed_type": "absolute",
}


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "aim_v2_lit"
    vision: dict[str, Any] = field(default_factory=lambda: dict(LARGE_224))
    text_embed_dim: int = 768
    text_num_blocks: int = 12
    text_num_heads: int = 6
    text_mlp_hidden_dim: int = 2048
    vocab_size: int = 49408
    max_context_length: int = 77
    eos_token_id: int = 49407
    projection_dim: int = 768
    max_logit_scale: float = 100.0

    def validate(self) -> None:
        vision = self.vision_args
        if vision.model_type != "aim_v2" or vision.num_classes:
            raise ConfigError("field 'vision' must describe an aim_v2 trunk without a classifier")
        for name in (
            "text_embed_dim",
            "text_num_blocks",
            "text_num_heads",
            "text_mlp_hidden_dim",
            "vocab_size",
            "max_context_length",
            "projection_dim",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"field {name!r} must be positive, got {getattr(self, name)}")
        if self.text_embed_dim % self.text_num_heads:
            raise ConfigError(
                f"field 'text_embed_dim' ({self.text_embed_dim}) must be divisible by "
                f"'text_num_heads' ({self.text_num_heads})"
            )
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ConfigError(
                f"field 'eos_token_id' ({self.eos_token_id}) must be a token id below "
                f"'vocab_size' ({self.vocab_size})"
            )
        if self.max_logit_scale < 1:
            raise ConfigError(f"field 'max_logit_scale' must be >= 1, got {self.max_logit_scale}")

    @property
    def vision_args(self) -> aim_v2.ModelArgs:
        try:
            return aim_v2.ModelArgs.from_dict(self.vision)
        except ConfigError as e:
            raise ConfigError(f"field 'vision': {e}") from None


class ImageEncoder(aim_v2.Model):
    """AIMv2 trunk whose attention-pooling head reads the final-norm tokens: ``(B, D)`` features."""

    def __init__(self, args: aim_v2.ModelArgs):
        super().__init__(args)
        self.head = AttentionPoolingClassifier(
            args.embed_dim, args.embed_dim, args.num_heads, use_batch_norm=False, linear_bias=True
        )

    def probe_features(self, images: mx.array) -> mx.array:
        """The head's input: the final-norm tokens (B, N, D)."""
        return self.encode(images)


class TextPreprocessor(nn.Module):
    """Token embeddings plus a learned (max_context_length, D) position table."""

    def __init__(self, vocab_size: int, dim: int, max_context_length: int):
        super().__init__()
        self.text_embedding = nn.Embedding(vocab_size, dim)
        self.positional_embedding = mx.zeros((max_context_length, dim))

    def __call__(self, input_ids: mx.array) -> mx.array:
        length = input_ids.shape[1]
        if length > self.positional_embedding.shape[0]:
            raise ValueError(
                f"the text tower reads at most {self.positional_embedding.shape[0]} tokens, "
                f"got {length}; truncate the ids (the tokenizer does)"
            )
        return self.text_embedding(input_ids) + self.positional_embedding[:length]


class TextEncoder(nn.Module):
    """Causal RMSNorm/SwiGLU transformer; the sentence feature is the token at the first EOS."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.text_embed_dim
        self.eos_token_id = args.eos_token_id
        self.preprocessor = TextPreprocessor(args.vocab_size, dim, args.max_context_length)
        blocks = [
            Block(dim, args.text_num_heads, SwiGLU(dim, args.text_mlp_hidden_dim), rms_norm)
            for _ in range(args.text_num_blocks)
        ]
        self.trunk = Transformer(blocks, rms_norm(dim))

    def __call__(self, input_ids: mx.array) -> mx.array:
        tokens = self.trunk(self.preprocessor(input_ids), "causal")
        eos = mx.argmax((input_ids == self.eos_token_id).astype(mx.int32), axis=1)  # first EOS
        return mx.take_along_axis(tokens, eos[:, None, None].astype(mx.int32), axis=1)[:, 0]


def l2_normalize(x: mx.array) -> mx.array:
    """``x`` scaled to unit L2 norm along the last axis."""
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Model(nn.Module):
    """AIMv2 LiT dual encoder.

    ``encode_image(images)`` (NHWC) and ``encode_text(input_ids)`` return the projected,
    unnormalized embeddings (B, projection_dim); ``model(images, input_ids)`` returns
    ``(logits_per_image, logits_per_text)`` as ml-aim does. ``model.tokenizer`` (set by
    ``mlx_aim.load`` when the checkpoint ships its tokenizer files) turns strings into ids.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        vision = args.vision_args
        self.image_encoder = ImageEncoder(vision)
        self.text_encoder = TextEncoder(args)
        self.image_projector = nn.Linear(vision.embed_dim, args.projection_dim, bias=False)
        self.text_projector = nn.Linear(args.text_embed_dim, args.projection_dim, bias=False)
        self.log_logit_scale = mx.array(math.log(1 / 0.07))
        self.tokenizer = None

    def encode_image(self, images: mx.array) -> mx.array:
        """Image embeddings (B, projection_dim) of preprocessed NHWC images."""
        return self.image_projector(self.image_encoder(images))

    def encode_text(self, input_ids: mx.array) -> mx.array:
        """Text embeddings (B, projection_dim) of token ids (B, L), L <= max_context_length."""
        return self.text_projector(self.text_encoder(input_ids))

    @property
    def logit_scale(self) -> mx.array:
        """``exp(log_logit_scale)`` with the log-scale clamped to ``[0, log(max_logit_scale)]``."""
        return mx.exp(mx.clip(self.log_logit_scale, 0.0, math.log(self.args.max_logit_scale)))

    def logits(self, image_embeds: mx.array, text_embeds: mx.array) -> mx.array:
        """Scaled cosine similarities (B_images, B_texts) of two sets of embeddings."""
        return self.logit_scale * l2_normalize(image_embeds) @ l2_normalize(text_embeds).T

    def __call__(self, images: mx.array, input_ids: mx.array) -> tuple[mx.array, mx.array]:
        logits_per_image = self.logits(self.encode_image(images), self.encode_text(input_ids))
        return logits_per_image, logits_per_image.T

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Transpose a torch-layout patch weight of the image tower; idempotent."""
        prefix = "image_encoder."
        image = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        image = sanitize_vision_weights(self.image_encoder, image)
        rest = {k: v for k, v in weights.items() if not k.startswith(prefix)}
        return {**rest, **{prefix + k: v for k, v in image.items()}}
