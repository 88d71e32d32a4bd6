"""Building blocks shared by the AIM models (ViT trunk pieces, masks, positions, pooling)."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu import ops
from ..cpu.ops import attention, gelu

Mask = mx.array | str | None
NormFactory = Callable[[int], nn.Module]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) computed by ``ops.layer_norm``: native on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        weight = self.weight if "weight" in self else None
        bias = self.bias if "bias" in self else None
        return ops.layer_norm(x, weight, bias, self.eps)


def layer_norm(dim: int) -> LayerNorm:
    """AIMv1 LayerNorm: weight and bias, eps 1e-6."""
    return LayerNorm(dim, eps=1e-6)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameter) computed by ``ops.rms_norm``: native on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        return ops.rms_norm(x, self.weight, self.eps)


def rms_norm(dim: int) -> RMSNorm:
    """AIMv2 RMSNorm: weight only, eps 1e-5."""
    return RMSNorm(dim, eps=1e-5)


@lru_cache(maxsize=32)
def _sincos_table(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    col_angles = cols.reshape(-1, 1) * omega
    row_angles = rows.reshape(-1, 1) * omega
    table = np.concatenate(
        [np.sin(col_angles), np.cos(col_angles), np.sin(row_angles), np.cos(row_angles)], axis=1
    )
    return table.astype(np.float32)


def sincos_pos_embed(grid_h: int, grid_w: int, dim: int) -> mx.array:
    """2-D sin-cos position table (grid_h * grid_w, dim) in the MAE / ml-aim layout.

    Patch n = row * grid_w + col gets ``[sin(col w) | cos(col w) | sin(row w) | cos(row w)]`` with
    ``w_i = 10000 ** (-i / (dim / 4))``.
    """
    return mx.array(_sincos_table(grid_h, grid_w, dim))


def prefix_causal_mask(prefix_lengths: mx.array, num_tokens: int) -> mx.array:
    """Boolean attention mask (B, 1, N, N) for prefix-causal attention.

    Query i may attend key j iff ``j <= i`` (causal) or ``j < S_b`` (the prefix of sample b is
    bidirectional).
    """
    idx = mx.arange(num_tokens)
    causal = idx[None, :] <= idx[:, None]
    in_prefix = idx[None, None, :] < prefix_lengths.reshape(-1, 1, 1)
    return (causal[None] | in_prefix)[:, None]


def patchify(images: mx.array, patch_size: int) -> mx.array:
    """Split NHWC images into (B, K, p*p*C) patches, raster order, pixels as (row, col, channel)."""
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection followed by a norm.

    The projection is stored as a ``Conv2d`` weight (D, p, p, C) so checkpoints keep the ml-aim key
    ``patchifier.proj``; it is applied as one matmul over the patchified image, which is the same
    math and much faster than a strided convolution on every backend.
    """

    def __init__(self, patch_size: int, num_channels: int, dim: int, norm: NormFactory):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(num_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm(dim)

    def __call__(self, images: mx.array) -> mx.array:
        patches = patchify(images, self.patch_size)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)
        return self.norm(patches @ weight.T + self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused, bias-free qkv projection (ml-aim layout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array, mask: Mask = None) -> mx.array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = (t.squeeze(0) for t in mx.split(qkv, 3))  # qkv[i] would gather (scatter in vjp)
        out = attention(q, k, v, self.scale, mask)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, d))


class MLP(nn.Module):
    """Bias-free two-layer MLP with exact (erf) GELU, as in AIMv1."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=False)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """Bias-free SwiGLU feed-forward of AIMv2: ``fc2(silu(fc1 x) * fc3 x)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=False)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(ops.silu_gate(self.fc1(x), self.fc3(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x += attn(norm_1(x)); x += mlp(norm_2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm: NormFactory):
        super().__init__()
        self.norm_1 = norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm_2 = norm(dim)
        self.mlp = mlp

    def __call__(self, x: mx.array, mask: Mask = None) -> mx.array:
        x = x + self.attn(self.norm_1(x), mask=mask)
        return x + self.mlp(self.norm_2(x))


class Transformer(nn.Module):
    """A stack of blocks and the final ``post_trunk_norm``.

    Set ``checkpoint_blocks`` to recompute each block's activations in the backward pass
    (activation checkpointing) instead of keeping them in memory.
    """

    def __init__(self, blocks: list[Block], post_trunk_norm: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.post_trunk_norm = post_trunk_norm
        self.checkpoint_blocks = False

    def features(self, x: mx.array, mask: Mask = None, max_block_id: int = -1) -> list[mx.array]:
        """Raw outputs of blocks 0..max_block_id (all blocks for -1)."""
        last = len(self.blocks) - 1 if max_block_id < 0 else max_block_id
        if last >= len(self.blocks):
            raise ValueError(f"max_block_id {max_block_id} but the trunk has {len(self.blocks)}")
        outputs = []
        for block in self.blocks[: last + 1]:
            if self.checkpoint_blocks:
                x = nn.utils.checkpoint(block)(x, mask)
            else:
                x = block(x, mask)
            outputs.append(x)
        return outputs

    def __call__(self, x: mx.array, mask: Mask = None) -> mx.array:
        return self.post_trunk_norm(self.features(x, mask)[-1])


class AttentionPoolingClassifier(nn.Module):
    """Attentive probe of the released AIM checkpoints.

    Optional BatchNorm (no affine, eps 1e-6) over the token features, one learnable query per output
    (``cls_token``), bias-free k and v projections, ``num_heads`` heads, the mean over queries, then
    a linear layer.
    """

    def __init__(
        self,
        dim: int,
        out_features: int,
        num_heads: int,
        num_queries: int = 1,
        use_batch_norm: bool = True,
        linear_bias: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        if use_batch_norm:
            self.bn = nn.BatchNorm(dim, eps=1e-6, affine=False)
        self.cls_token = 0.02 * mx.random.normal((1, num_queries, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, out_features, bias=linear_bias)

    def pool(self, x: mx.array) -> mx.array:
        """Attention-pooled feature (B, D) before the final linear layer."""
        if "bn" in self:
            x = self.bn(x)
        b, n, d = x.shape
        heads = self.num_heads
        q = mx.broadcast_to(self.cls_token, (b, *self.cls_token.shape[1:]))
        q = q.reshape(b, -1, heads, d // heads).transpose(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)
        out = attention(q, k, v, self.scale)
        return out.transpose(0, 2, 1, 3).reshape(b, -1, d).mean(axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(self.pool(x))


class LinearClassifier(nn.Module):
    """Linear-probe baseline: BatchNorm (no affine) on the token-mean feature, then a linear layer."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.bn = nn.BatchNorm(dim, eps=1e-6, affine=False)
        self.linear = nn.Linear(dim, out_features, bias=True)

    def pool(self, x: mx.array) -> mx.array:
        """Mean over tokens (B, D)."""
        return x.mean(axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(self.bn(self.pool(x)))


def build_classifier(args) -> nn.Module:
    """The probe head a config asks for (``head``: attentive or linear)."""
    if args.head == "linear":
        return LinearClassifier(args.embed_dim, args.num_classes)
    return AttentionPoolingClassifier(args.embed_dim, args.num_classes, args.num_heads)


class SinCosPreprocessor(nn.Module):
    """Patch embedding (conv + norm) plus fixed 2-D sin-cos positions; no class token."""

    def __init__(self, patch_size: int, num_channels: int, dim: int, norm: NormFactory):
        super().__init__()
        self.patchifier = PatchEmbed(patch_size, num_channels, dim, norm)

    def positions(self, height: int, width: int) -> mx.array:
        p = self.patchifier.patch_size
        return sincos_pos_embed(height // p, width // p, self.patchifier.proj.weight.shape[0])

    def __call__(self, images: mx.array) -> mx.array:
        tokens = self.patchifier(images)
        return tokens + self.positions(images.shape[1], images.shape[2]).astype(tokens.dtype)
