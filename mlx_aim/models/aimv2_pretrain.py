"""AIMv2 pre-training model: a prefix-attention AIMv2 encoder and a causal multimodal decoder.

AIMv2 (arXiv 2411.14402 §2) feeds the encoder's image features, followed by the caption's token
embeddings, to one causal decoder that predicts the next image patch and then the next caption
token. Apple released no pre-training code; this module follows the paper where it is specific
and makes these documented choices where it is not:

- the encoder is an ordinary ``aim_v2`` trunk run with prefix-causal attention (as AIMv1's
  pre-training runs its trunk, ``models/pretrain.py``); its final-norm tokens are the features;
- ``decoder.image_proj`` (no bias) maps the features to the decoder width, ``decoder.token_embed``
  embeds the caption tokens, and one learned position table (``decoder.pos_embed``, N(0, 0.02))
  covers the K image positions followed by ``max_text_tokens`` text positions (the encoder's own
  positions stay inside its features; the decoder needs its own for the text);
- the decoder is a stack of AIMv2 blocks (RMSNorm, bias-free attention, SwiGLU) with plain causal
  attention over the whole image-then-text sequence and a final RMSNorm. Causality keeps the
  image part from reading patches beyond the ones it predicts: the encoder feature at position
  j sees only patches < max(S, j + 1), and the decoder output at k reads features j <= k;
- two separate heads: ``pixel_head`` (with bias) to the p*p*C pixels of the next patch, and
  ``text_head`` (no bias, not tied to the embedding) to the vocabulary.

Paper defaults: a decoder 1024 wide and 12 deep for every encoder size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import build_model_args
from .aim_v2 import Model as AIMv2Encoder
from .base import BaseModelArgs, ConfigError
from .layers import Block, SwiGLU, Transformer, prefix_causal_mask, rms_norm


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "aimv2_pretrain"
    encoder: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 1024
    max_text_tokens: int = 32
    decoder_width: int = 1024
    decoder_depth: int = 12
    decoder_heads: int = 8
    decoder_mlp_ratio: float = 2.75

    def validate(self) -> None:
        for name in ("vocab_size", "max_text_tokens", "decoder_width", "decoder_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"field {name!r} must be positive, got {getattr(self, name)}")
        if self.decoder_depth < 1 or self.decoder_mlp_ratio <= 0:
            raise ConfigError(
                f"fields 'decoder_depth' ({self.decoder_depth}) and 'decoder_mlp_ratio' "
                f"({self.decoder_mlp_ratio}) must be >= 1 and > 0"
            )
        if self.decoder_width % self.decoder_heads:
            raise ConfigError(
                f"field 'decoder_width' ({self.decoder_width}) must be divisible by "
                f"'decoder_heads' ({self.decoder_heads})"
            )
        encoder = build_model_args(self.encoder)
        if encoder.model_type != "aim_v2" or encoder.num_classes:
            raise ConfigError("field 'encoder' must describe an aim_v2 trunk without a classifier")
        if encoder.pos_embed_type != "absolute":
            raise ConfigError("field 'encoder' must use learned ('absolute') positions")

    @property
    def encoder_args(self) -> BaseModelArgs:
        return build_model_args(self.encoder)


class MultimodalDecoder(nn.Module):
    """Causal decoder over [image features; caption tokens] with a pixel and a text head."""

    def __init__(self, args: ModelArgs, encoder_dim: int, num_patches: int, patch_dim: int):
        super().__init__()
        width = args.decoder_width
        hidden = int(args.decoder_mlp_ratio * width)
        self.image_proj = nn.Linear(encoder_dim, width, bias=False)
        self.token_embed = nn.Embedding(args.vocab_size, width)
        self.pos_embed = 0.02 * mx.random.normal((1, num_patches + args.max_text_tokens, width))
        blocks = [
            Block(width, args.decoder_heads, SwiGLU(width, hidden), rms_norm)
            for _ in range(args.decoder_depth)
        ]
        self.transformer = Transformer(blocks, rms_norm(width))
        self.pixel_head = nn.Linear(width, patch_dim, bias=True)
        self.text_head = nn.Linear(width, args.vocab_size, bias=False)

    def __call__(self, features: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """Pixels (B, K, p*p*C) and text logits (B, T, V) of features (B, K, D), tokens (B, T)."""
        num_patches = features.shape[1]
        x = mx.concatenate([self.image_proj(features), self.token_embed(tokens)], axis=1)
        if x.shape[1] > self.pos_embed.shape[1]:
            raise ValueError(
                f"{tokens.shape[1]} caption tokens, but the decoder has positions for at most "
                f"{self.pos_embed.shape[1] - num_patches}"
            )
        x = self.transformer(x + self.pos_embed[:, : x.shape[1]], "causal")
        return self.pixel_head(x[:, :num_patches]), self.text_head(x[:, num_patches:])


class Model(nn.Module):
    """``encoder`` (an AIMv2 trunk) + ``decoder``.

    ``model(images, prefix_lengths, tokens)`` -> (pixels (B, K, p*p*C), logits (B, T, V)):
    ``pixels[:, k]`` predicts patch k + 1 (raster order) and ``logits[:, t]`` the caption token
    after ``tokens[:, t]``. Without ``tokens``, only the pixels: the image positions of the causal
    decoder never read the text, so they are the same.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        encoder_args = args.encoder_args
        self.encoder = AIMv2Encoder(encoder_args)
        patch_dim = encoder_args.patch_size**2 * encoder_args.num_channels
        self.decoder = MultimodalDecoder(
            args, encoder_args.embed_dim, encoder_args.num_patches, patch_dim
        )

    def set_grad_checkpoint(self, enabled: bool) -> None:
        """Recompute encoder and decoder blocks in the backward pass instead of storing them."""
        self.encoder.trunk.checkpoint_blocks = enabled
        self.decoder.transformer.checkpoint_blocks = enabled

    def __call__(
        self, images: mx.array, prefix_lengths: mx.array, tokens: mx.array | None = None
    ) -> tuple[mx.array, mx.array] | mx.array:
        patches = self.encoder.preprocessor(images)
        mask = prefix_causal_mask(prefix_lengths, patches.shape[1])
        text = mx.zeros((images.shape[0], 0), mx.int32) if tokens is None else tokens
        pixels, logits = self.decoder(self.encoder.trunk(patches, mask), text)
        return pixels if tokens is None else (pixels, logits)
