"""AIM pre-training model: a prefix-causal trunk plus the pixel-prediction MLP head.

Apple released no pre-training code, so the head follows the AIMv1 paper (§4.2, Table 4) where it is
specific and makes these documented choices where it is not:

- the trunk's final-norm tokens get the 2-D sin-cos positions added again (at trunk width);
- ``proj_in`` (no bias) maps them to the head width W;
- ``head_blocks`` residual blocks ``x = x + MLP(LayerNorm(x))`` (GELU, ratio ``head_mlp_ratio``,
  no biases), applied to every patch independently (no attention);
- a final LayerNorm and ``proj_out`` (with bias) to the p*p*C pixels of the next patch.

Paper defaults: 12 blocks of width 2048.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

from . import build_model_args, get_model_class
from .base import BaseModelArgs, ConfigError
from .layers import MLP, layer_norm, prefix_causal_mask, sincos_pos_embed

if TYPE_CHECKING:
    from ..data.transforms import Preprocessing


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "aim_pretrain"
    encoder: dict[str, Any] = field(default_factory=dict)
    head_blocks: int = 12
    head_width: int = 2048
    head_mlp_ratio: float = 4.0

    def validate(self) -> None:
        if self.head_blocks < 0 or self.head_width <= 0:
            raise ConfigError(
                f"fields 'head_blocks' ({self.head_blocks}) and 'head_width' ({self.head_width}) "
                "must be >= 0 and > 0"
            )
        encoder = build_model_args(self.encoder)
        if getattr(encoder, "num_classes", 0):
            raise ConfigError("field 'encoder' must describe a trunk without a classifier")

    @property
    def encoder_args(self) -> BaseModelArgs:
        return build_model_args(self.encoder)


class HeadBlock(nn.Module):
    """Per-patch residual MLP block ``x + MLP(LayerNorm(x))``."""

    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        self.norm = layer_norm(width)
        self.mlp = MLP(width, int(mlp_ratio * width))

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.mlp(self.norm(x))


class PixelPredictionHead(nn.Module):
    """Maps trunk tokens (..., D) to next-patch pixels (..., p*p*C), each token on its own."""

    def __init__(self, dim: int, width: int, num_blocks: int, mlp_ratio: float, out_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, width, bias=False)
        self.blocks = [HeadBlock(width, mlp_ratio) for _ in range(num_blocks)]
        self.norm = layer_norm(width)
        self.proj_out = nn.Linear(width, out_dim, bias=True)
        self.checkpoint_blocks = False

    def __call__(self, x: mx.array) -> mx.array:
        x = self.proj_in(x)
        for block in self.blocks:
            x = nn.utils.checkpoint(block)(x) if self.checkpoint_blocks else block(x)
        return self.proj_out(self.norm(x))


class Model(nn.Module):
    """``encoder`` (an AIM trunk) + ``head``; ``model(images, prefix_lengths)`` -> (B, K, p*p*C).

    ``predictions[:, k]`` predicts patch k + 1 in raster order (or step k + 1 of ``order``); trunk
    attention is prefix-causal with the per-image prefix lengths (0: plain causal). ``encode`` and ``head`` are the two halves, for a caller that runs
    the head on only some positions (the training step).
    """

    preprocessing: Preprocessing | None = None  # how images are prepared (set by mlx_aim.load)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        encoder_args = args.encoder_args
        self.encoder = get_model_class(encoder_args.model_type)(encoder_args)
        patch_dim = encoder_args.patch_size**2 * encoder_args.num_channels
        self.head = PixelPredictionHead(
            encoder_args.embed_dim,
            args.head_width,
            args.head_blocks,
            args.head_mlp_ratio,
            patch_dim,
        )

    def set_grad_checkpoint(self, enabled: bool) -> None:
        """Recompute trunk and head blocks in the backward pass instead of storing activations."""
        self.encoder.trunk.checkpoint_blocks = enabled
        self.head.checkpoint_blocks = enabled

    def encode(
        self, images: mx.array, prefix_lengths: mx.array, order: mx.array | None = None
    ) -> mx.array:
        """The head's input (B, K, D): prefix-causal trunk tokens with the positions added again.

        ``order`` (K,) permutes the patch tokens after their positions are added, so the mask
        and the output follow that order (None: raster order).
        """
        tokens = self.encoder.preprocessor(images)
        p = self.encoder.args.patch_size
        positions = sincos_pos_embed(images.shape[1] // p, images.shape[2] // p, tokens.shape[-1])
        if order is not None:
            tokens, positions = tokens[:, order], positions[order]
        mask = prefix_causal_mask(prefix_lengths, tokens.shape[1])
        z = self.encoder.trunk(tokens, mask)
        return z + positions.astype(z.dtype)

    def __call__(
        self, images: mx.array, prefix_lengths: mx.array, order: mx.array | None = None
    ) -> mx.array:
        """Next-patch predictions (B, K, p*p*C); ``[:, k]`` predicts the patch at step k + 1."""
        return self.head(self.encode(images, prefix_lengths, order))
