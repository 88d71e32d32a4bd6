"""Plain-MLX AIM models: the benchmark's MLX baseline, written the way apple/ml-aim writes MLX layers.

Everything is spelled out with core MLX ops and nothing is compiled: attention is
``softmax(q k^T * scale + additive mask) v`` over materialised scores, the patch embedding is a strided
``nn.Conv2d`` over the NHWC image, sin-cos positions are rebuilt from ``mx`` ops on every call, and
the pixel targets are computed inline. Parameter keys are exactly mlx-aim's (ml-aim's), so
``model.load_weights(list(tree_flatten(mlx_aim_model.parameters()).items()))`` shares weights with
an mlx-aim model of the same config; ``tests/test_plain_mlx.py`` checks that both compute the same
loss.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

MASKED = -1e9  # additive score for a key a query may not see (as nn.MultiHeadAttention's masks)


def _layer_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)


def _rms_norm(dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-5)


def sincos_positions(grid_h: int, grid_w: int, dim: int) -> mx.array:
    """(grid_h * grid_w, dim) table ``[sin col | cos col | sin row | cos row]``, raster order."""
    quarter = dim // 4
    omega = 1.0 / mx.power(10000.0, mx.arange(quarter, dtype=mx.float32) / quarter)
    cols = mx.tile(mx.arange(grid_w, dtype=mx.float32), grid_h)
    rows = mx.repeat(mx.arange(grid_h, dtype=mx.float32), grid_w)
    col_angles = cols[:, None] * omega[None, :]
    row_angles = rows[:, None] * omega[None, :]
    return mx.concatenate(
        [mx.sin(col_angles), mx.cos(col_angles), mx.sin(row_angles), mx.cos(row_angles)], axis=1
    )


def additive_prefix_causal_mask(prefix_lengths: mx.array, num_tokens: int) -> mx.array:
    """Float mask (B, 1, N, N): 0 where query i may see key j (j <= i or j < S_b), else MASKED."""
    idx = mx.arange(num_tokens)
    allowed = (idx[None, None, :] <= idx[None, :, None]) | (
        idx[None, None, :] < prefix_lengths[:, None, None]
    )
    return mx.where(allowed, 0.0, MASKED)[:, None].astype(mx.float32)


class PatchEmbed(nn.Module):
    """Strided convolution over NHWC images, flattened to tokens, then a norm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_layer):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.proj(x)
        b, h, w, d = x.shape
        return self.norm(x.reshape(b, h * w, d))


class Preprocessor(nn.Module):
    """Patch embedding plus positions: learned ``pos_embed`` (AIMv2 absolute) or sin-cos."""

    def __init__(self, patchifier: PatchEmbed, num_patches: int | None):
        super().__init__()
        self.patchifier = patchifier
        if num_patches is not None:
            dim = patchifier.proj.weight.shape[0]
            self.pos_embed = mx.zeros((1, num_patches, dim))

    def __call__(self, x: mx.array) -> mx.array:
        tokens = self.patchifier(x)
        if "pos_embed" in self:
            return tokens + self.pos_embed
        p = self.patchifier.patch_size
        return tokens + sincos_positions(x.shape[1] // p, x.shape[2] // p, tokens.shape[-1])


class Attention(nn.Module):
    """Multi-head attention with explicit scores, additive mask and softmax."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        qkv = qkv.transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.swapaxes(-1, -2)
        if mask is not None:
            attn = attn + mask
        attn = mx.softmax(attn, axis=-1)
        x = (attn @ v).swapaxes(1, 2).reshape(b, n, c)
        return self.proj(x)


class MLP(nn.Module):
    """fc1 -> exact GELU -> fc2, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """fc2(silu(fc1 x) * fc3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm_1 x)``, then ``x + mlp(norm_2 x)``."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm_layer):
        super().__init__()
        self.norm_1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm_2 = norm_layer(dim)
        self.mlp = mlp

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        x = x + self.attn(self.norm_1(x), mask=mask)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, blocks: list[Block], post_trunk_norm: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.post_trunk_norm = post_trunk_norm

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.post_trunk_norm(x)


class Encoder(nn.Module):
    """AIMv1 (LayerNorm, GELU, sin-cos) or AIMv2 (RMSNorm, SwiGLU) trunk; returns final-norm tokens."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        v2 = config["model_type"] == "aim_v2"
        dim, heads = config["embed_dim"], config["num_heads"]
        patch, size = config["patch_size"], config.get("image_size", 224)
        norm = _rms_norm if v2 else _layer_norm
        self.patch_size = patch
        absolute = v2 and config.get("pos_embed_type", "absolute") == "absolute"
        self.preprocessor = Preprocessor(
            PatchEmbed(patch, config.get("num_channels", 3), dim, norm),
            (size // patch) ** 2 if absolute else None,
        )
        if v2:
            hidden = config.get("mlp_hidden_dim", 2816)
            blocks = [
                Block(dim, heads, SwiGLUFFN(dim, hidden), norm) for _ in range(config["num_blocks"])
            ]
        else:
            hidden = int(config.get("mlp_ratio", 4.0) * dim)
            blocks = [
                Block(dim, heads, MLP(dim, hidden), norm) for _ in range(config["num_blocks"])
            ]
        self.trunk = Trunk(blocks, norm(dim))

    def __call__(self, images: mx.array, mask: mx.array | None = None) -> mx.array:
        return self.trunk(self.preprocessor(images), mask=mask)


class HeadBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = _layer_norm(width)
        self.mlp = MLP(width, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.mlp(self.norm(x))


class PixelHead(nn.Module):
    """proj_in -> per-token residual MLP blocks -> LayerNorm -> proj_out to p*p*C pixels."""

    def __init__(self, dim: int, width: int, num_blocks: int, mlp_ratio: float, out_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, width, bias=False)
        self.blocks = [HeadBlock(width, int(mlp_ratio * width)) for _ in range(num_blocks)]
        self.norm = _layer_norm(width)
        self.proj_out = nn.Linear(width, out_dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(self.norm(x))


class AIMForPretraining(nn.Module):
    """Prefix-causal encoder and pixel head; ``pred[:, k]`` predicts patch k + 1."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        enc = config["encoder"]
        self.encoder = Encoder(enc)
        self.head = PixelHead(
            enc["embed_dim"],
            config.get("head_width", 2048),
            config.get("head_blocks", 12),
            config.get("head_mlp_ratio", 4.0),
            enc["patch_size"] ** 2 * enc.get("num_channels", 3),
        )

    def __call__(self, images: mx.array, prefix_lengths: mx.array) -> mx.array:
        p = self.encoder.patch_size
        h, w = images.shape[1] // p, images.shape[2] // p
        mask = additive_prefix_causal_mask(prefix_lengths, h * w)
        z = self.encoder(images, mask=mask)
        return self.head(z + sincos_positions(h, w, z.shape[-1]))


def pretraining_loss(
    pred: mx.array, images: mx.array, prefix_lengths: mx.array, patch_size: int
) -> mx.array:
    """Next-patch MSE on per-patch normalized pixels (unbiased var, eps 1e-6), non-prefix targets."""
    b, h, w, c = images.shape
    p = patch_size
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // p) * (w // p), p * p * c)
    mean = patches.mean(axis=-1, keepdims=True)
    var = mx.square(patches - mean).sum(axis=-1, keepdims=True) / (p * p * c - 1)
    target = (patches - mean) / mx.sqrt(var + 1e-6)
    k = target.shape[1]
    err = mx.square(pred[:, : k - 1] - target[:, 1:]).mean(axis=-1)
    valid = (mx.arange(1, k)[None, :] >= prefix_lengths[:, None]).astype(err.dtype)
    return (err * valid).sum() / valid.sum()
