"""PyTorch reference models for AIMv1, AIMv2 and the AIM pre-training objective.

Written from the AIM / AIMv2 papers and the project's design notes, independently of the MLX
models, so parity tests can compare the two. ``state_dict`` keys are exactly the released
apple/ml-aim keys. Inputs are NCHW, as usual in PyTorch. Models hold a BatchNorm (AIMv1 head):
call ``.eval()`` before comparing outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6
RMS_NORM_EPS = 1e-5
BATCH_NORM_EPS = 1e-6


def _v1(embed_dim: int, num_blocks: int, num_heads: int) -> dict:
    return dict(
        model_type="aimv1",
        image_size=224,
        patch_size=14,
        embed_dim=embed_dim,
        num_blocks=num_blocks,
        num_heads=num_heads,
        num_classes=1000,
    )


def _v2(embed_dim: int, num_heads: int, mlp_hidden_dim: int, pos: str = "absolute") -> dict:
    return dict(
        model_type="aimv2",
        image_size=224,
        patch_size=14,
        embed_dim=embed_dim,
        num_blocks=24,
        num_heads=num_heads,
        mlp_hidden_dim=mlp_hidden_dim,
        pos_embed_type=pos,
    )


# Released architectures (apple/ml-aim), for shape checks without allocating weights.
REFERENCE_ARCHS: dict[str, dict] = {
    "aim-600M": _v1(1536, 24, 12),
    "aim-1B": _v1(2048, 24, 16),
    "aim-3B": _v1(3072, 24, 24),
    "aim-7B": _v1(4096, 32, 32),
    "aimv2-large-patch14-224": _v2(1024, 8, 2816),
    "aimv2-huge-patch14-224": _v2(1536, 12, 4096),
    "aimv2-1B-patch14-224": _v2(2048, 16, 5632),
    "aimv2-3B-patch14-224": _v2(3072, 24, 8192),
    "aimv2-large-patch14-native": _v2(1024, 8, 2816, pos="sincos"),
}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def sincos_pos_embed(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """2-D sin-cos table (grid_h*grid_w, dim) in raster order: [sin_col|cos_col|sin_row|cos_row]."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    col_angles = cols.reshape(-1, 1) * omega
    row_angles = rows.reshape(-1, 1) * omega
    table = torch.cat(
        [col_angles.sin(), col_angles.cos(), row_angles.sin(), row_angles.cos()], dim=-1
    )
    return table.to(torch.float32)


def prefix_causal_mask(prefix_lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, N, N): allowed[b, i, j] = (j <= i) or (j < S_b)."""
    idx = torch.arange(num_tokens, device=prefix_lengths.device)
    causal = idx[None, :] <= idx[:, None]
    prefix = idx[None, None, :] < prefix_lengths.reshape(-1, 1, 1)
    return (causal[None] | prefix)[:, None]


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (Conv2d with bias) followed by a norm."""

    def __init__(self, patch_size: int, num_channels: int, embed_dim: int, norm: nn.Module):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(num_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Preprocessor(nn.Module):
    """Patchify and add positions: a learned (1, N, D) table or a 2-D sin-cos table."""

    def __init__(self, patchifier: PatchEmbed, num_patches: int | None):
        super().__init__()
        self.patchifier = patchifier
        if num_patches is not None:
            dim = patchifier.proj.out_channels
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        else:
            self.pos_embed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patchifier(x)
        if self.pos_embed is not None:
            if tokens.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(
                    f"input gives {tokens.shape[1]} patches, the learned position table has "
                    f"{self.pos_embed.shape[1]}"
                )
            return tokens + self.pos_embed
        p = self.patchifier.patch_size
        table = sincos_pos_embed(x.shape[-2] // p, x.shape[-1] // p, tokens.shape[-1])
        return tokens + table.to(tokens.device, tokens.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q|k|v projection, no biases."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class GeluMLP(nn.Module):
    """fc2(gelu(fc1 x)) with exact (erf) GELU, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """fc2(silu(fc1 x) * fc3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm_1 x); x += mlp(norm_2 x)."""

    def __init__(self, attn: Attention, mlp: nn.Module, norm_1: nn.Module, norm_2: nn.Module):
        super().__init__()
        self.attn = attn
        self.norm_1 = norm_1
        self.mlp = mlp
        self.norm_2 = norm_2

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), mask)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """Stack of blocks plus the post-trunk norm (applied by the caller)."""

    def __init__(self, blocks: list[Block], post_trunk_norm: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.post_trunk_norm = post_trunk_norm

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, max_block_id: int = -1
    ) -> list[torch.Tensor]:
        """Raw outputs of blocks 0..max_block_id (all blocks for -1)."""
        last = len(self.blocks) - 1 if max_block_id == -1 else max_block_id
        if not 0 <= last < len(self.blocks):
            raise ValueError(f"max_block_id {max_block_id} outside 0..{len(self.blocks) - 1}")
        features = []
        for block in self.blocks[: last + 1]:
            x = block(x, mask)
            features.append(x)
        return features


class AttentionPoolHead(nn.Module):
    """One learned query attends over the tokens (heads = trunk heads), then a linear layer.

    AIMv1 probe: BatchNorm1d(affine=False) on the features first, linear without bias.
    AIMv2 LiT image head: no BatchNorm, linear with bias.
    """

    def __init__(self, dim: int, out_dim: int, num_heads: int, batch_norm: bool, linear_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, out_dim, bias=linear_bias)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=BATCH_NORM_EPS) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        if self.bn is not None:
            x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        hd = d // self.num_heads
        q = self.cls_token.expand(b, 1, d).reshape(b, 1, self.num_heads, hd).transpose(1, 2)
        k = self.k(x).reshape(b, n, self.num_heads, hd).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.num_heads, hd).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, d)
        return self.linear(pooled)


def _grid_patches(image_size: int | Sequence[int], patch_size: int) -> int:
    h, w = _pair(image_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {(h, w)} is not a multiple of patch size {patch_size}")
    return (h // patch_size) * (w // patch_size)


class AIMv1Torch(nn.Module):
    """AIMv1: LayerNorm + GELU ViT with sin-cos positions and an optional attentive probe."""

    def __init__(
        self,
        image_size: int | Sequence[int],
        patch_size: int,
        embed_dim: int,
        num_blocks: int,
        num_heads: int,
        num_channels: int = 3,
        mlp_ratio: int = 4,
        num_classes: int = 0,
        probe_layers: Sequence[int] | None = None,
    ):
        super().__init__()
        _grid_patches(image_size, patch_size)

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

        patchifier = PatchEmbed(patch_size, num_channels, embed_dim, norm())
        self.preprocessor = Preprocessor(patchifier, num_patches=None)
        hidden = int(mlp_ratio * embed_dim)
        blocks = [
            Block(Attention(embed_dim, num_heads), GeluMLP(embed_dim, hidden), norm(), norm())
            for _ in range(num_blocks)
        ]
        self.trunk = Trunk(blocks, norm())
        if probe_layers is None:
            probe_layers = range(max(0, num_blocks - 6), num_blocks)
        self.probe_layers = tuple(int(i) for i in probe_layers)
        if not self.probe_layers or not all(0 <= i < num_blocks for i in self.probe_layers):
            raise ValueError(f"probe_layers {self.probe_layers} must lie in 0..{num_blocks - 1}")
        self.head = (
            AttentionPoolHead(embed_dim, num_classes, num_heads, batch_norm=True, linear_bias=False)
            if num_classes > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) with a head, else post-trunk-norm tokens (B, N, D)."""
        features = self.extract_features(x)
        if self.head is None:
            return self.trunk.post_trunk_norm(features[-1])
        probe = torch.stack([features[i] for i in self.probe_layers]).mean(dim=0)
        return self.head(probe)

    def extract_features(self, x: torch.Tensor, max_block_id: int = -1) -> list[torch.Tensor]:
        """Raw (pre-norm) outputs of blocks 0..max_block_id."""
        return self.trunk(self.preprocessor(x), max_block_id=max_block_id)


class AIMv2VisionTorch(nn.Module):
    """AIMv2 vision encoder: RMSNorm + SwiGLU ViT, learned or sin-cos positions, opt. LiT head."""

    def __init__(
        self,
        image_size: int | Sequence[int],
        patch_size: int,
        embed_dim: int,
        num_blocks: int,
        num_heads: int,
        mlp_hidden_dim: int,
        num_channels: int = 3,
        pos_embed_type: str = "absolute",
        head: str | None = None,
    ):
        super().__init__()
        if pos_embed_type not in ("absolute", "sincos"):
            raise ValueError(
                f"pos_embed_type must be 'absolute' or 'sincos', got {pos_embed_type!r}"
            )
        if head not in (None, "attention-pool"):
            raise ValueError(f"head must be None or 'attention-pool', got {head!r}")
        num_patches = _grid_patches(image_size, patch_size)

        def norm() -> nn.RMSNorm:
            return nn.RMSNorm(embed_dim, eps=RMS_NORM_EPS)

        patchifier = PatchEmbed(patch_size, num_channels, embed_dim, norm())
        self.preprocessor = Preprocessor(
            patchifier, num_patches if pos_embed_type == "absolute" else None
        )
        blocks = [
            Block(
                Attention(embed_dim, num_heads), SwiGLU(embed_dim, mlp_hidden_dim), norm(), norm()
            )
            for _ in range(num_blocks)
        ]
        self.trunk = Trunk(blocks, norm())
        self.head = (
            AttentionPoolHead(embed_dim, embed_dim, num_heads, batch_norm=False, linear_bias=True)
            if head
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Post-trunk-norm tokens (B, N, D), or the pooled head output (B, D) with a head."""
        tokens = self.trunk.post_trunk_norm(self.extract_features(x)[-1])
        return tokens if self.head is None else self.head(tokens)

    def extract_features(self, x: torch.Tensor, max_block_id: int = -1) -> list[torch.Tensor]:
        """Raw (pre-norm) outputs of blocks 0..max_block_id."""
        return self.trunk(self.preprocessor(x), max_block_id=max_block_id)


class PixelMLPBlock(nn.Module):
    """Residual per-token MLP block of the pixel head: x + mlp(norm(x))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = GeluMLP(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class PixelPredictionHead(nn.Module):
    """proj_in -> residual MLP blocks -> LayerNorm -> proj_out (with bias) to p*p*C pixels."""

    def __init__(self, dim: int, width: int, num_blocks: int, mlp_ratio: int, out_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, width, bias=False)
        self.blocks = nn.ModuleList(
            [PixelMLPBlock(width, int(mlp_ratio * width)) for _ in range(num_blocks)]
        )
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.proj_out = nn.Linear(width, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(self.norm(x))


class AIMForPretrainingTorch(nn.Module):
    """Prefix-causal encoder plus pixel head; pred[:, k] predicts patch k+1 (raster order)."""

    def __init__(
        self,
        encoder: AIMv1Torch | AIMv2VisionTorch,
        head_blocks: int,
        head_width: int,
        head_mlp_ratio: int = 4,
    ):
        super().__init__()
        if encoder.head is not None:
            raise ValueError("the pre-training encoder must be built without a classifier head")
        self.encoder = encoder
        proj = encoder.preprocessor.patchifier.proj
        self.patch_size = encoder.preprocessor.patchifier.patch_size
        out_dim = self.patch_size**2 * proj.in_channels
        self.head = PixelPredictionHead(
            proj.out_channels, head_width, head_blocks, head_mlp_ratio, out_dim
        )

    def forward(
        self, images: torch.Tensor, prefix_lengths: torch.Tensor, loss_positions: bool = False
    ) -> torch.Tensor:
        """images (B, C, H, W), prefix_lengths (B,) -> pred (B, K, p*p*C); with
        ``loss_positions`` only the predictions the loss reads, (M, p*p*C) in (b, k) order."""
        tokens = self.encoder.preprocessor(images)
        num_patches = tokens.shape[1]
        mask = prefix_causal_mask(prefix_lengths, num_patches)
        z = self.encoder.trunk.post_trunk_norm(self.encoder.trunk(tokens, mask)[-1])
        p = self.patch_size
        table = sincos_pos_embed(images.shape[-2] // p, images.shape[-1] // p, z.shape[-1])
        z = z + table.to(z.device, z.dtype)
        if loss_positions:
            k = torch.arange(num_patches, device=z.device)[None]
            z = z[(k >= prefix_lengths.reshape(-1, 1) - 1) & (k < num_patches - 1)]
        return self.head(z)


def patchify_nchw(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, K, p*p*C): raster patches, pixels in (row, col, channel) order."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def aim_pretraining_loss_torch(
    pred: torch.Tensor,
    images_nchw: torch.Tensor,
    prefix_lengths: torch.Tensor,
    patch_size: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Normalized-pixel next-patch MSE over non-prefix targets (t >= S_b), batch-averaged.

    ``pred`` is (B, K, p*p*C), or (M, p*p*C) from ``forward(..., loss_positions=True)``.
    """
    patches = patchify_nchw(images_nchw, patch_size)
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    target = (patches - mean) / torch.sqrt(var + eps)
    num_patches = target.shape[1]
    t = torch.arange(1, num_patches, device=target.device)
    valid = t[None, :] >= prefix_lengths.reshape(-1, 1)
    if pred.dim() == 2:
        return ((pred - target[:, 1:][valid]) ** 2).mean()
    err = ((pred[:, : num_patches - 1] - target[:, 1:]) ** 2).mean(dim=-1)
    valid = valid.to(err.dtype)
    return (err * valid).sum() / valid.sum()


@torch.no_grad()
def init_random_(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Fill every tensor with seeded random values (nothing left at ones or zeros).

    Weights, biases, cls_token, pos_embed ~ N(0, std); norm scales ~ U(0.5, 1.5);
    BatchNorm running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2); counters random integers.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict(keep_vars=True).items():
        shape = tensor.shape
        if not tensor.is_floating_point():
            value = torch.randint(1, 1000, shape, generator=gen)
        elif name.endswith("running_var"):
            value = torch.rand(shape, generator=gen) * 1.5 + 0.5
        elif name.endswith("running_mean"):
            value = torch.randn(shape, generator=gen) * 0.5
        elif _is_norm_scale(module, name):
            value = torch.rand(shape, generator=gen) + 0.5
        else:
            value = torch.randn(shape, generator=gen) * std
        tensor.copy_(value.to(tensor.dtype))
    return module


def _is_norm_scale(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    norm_types = (nn.LayerNorm, nn.RMSNorm)
    return leaf == "weight" and isinstance(module.get_submodule(owner), norm_types)


def build_reference(arch_kwargs: dict) -> AIMv1Torch | AIMv2VisionTorch:
    """Build AIMv1Torch or AIMv2VisionTorch from {"model_type": "aimv1"|"aimv2", **kwargs}."""
    kwargs = dict(arch_kwargs)
    model_type = kwargs.pop("model_type")
    classes = {"aimv1": AIMv1Torch, "aimv2": AIMv2VisionTorch}
    if model_type not in classes:
        raise ValueError(f"model_type must be 'aimv1' or 'aimv2', got {model_type!r}")
    return classes[model_type](**kwargs)


def expected_state_dict_shapes(arch_kwargs: dict, layout: str = "torch") -> dict[str, tuple]:
    """Key -> shape of the reference model for arch_kwargs, built on the meta device (no memory).

    layout "torch": the state_dict as torch holds it (conv (D, C, p, p), BN counter included);
    layout "mlx": the project's weight format (conv (D, p, p, C), no num_batches_tracked).
    """
    if layout not in ("torch", "mlx"):
        raise ValueError(f"layout must be 'torch' or 'mlx', got {layout!r}")
    with torch.device("meta"):
        model = build_reference(arch_kwargs)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if layout == "mlx":
        shapes.pop("head.bn.num_batches_tracked", None)
        d, c, ph, pw = shapes["preprocessor.patchifier.proj.weight"]
        shapes["preprocessor.patchifier.proj.weight"] = (d, ph, pw, c)
    return shapes


_HF_RENAMES = (
    ("preprocessor.patchifier.proj.", "embeddings.patch_embed."),
    ("preprocessor.patchifier.norm.", "embeddings.rms_norm."),
    ("trunk.post_trunk_norm.", "rms_norm."),
    ("trunk.blocks.", "encoder.layers."),
    (".attn.proj.", ".attention.out_proj."),
    (".mlp.fc1.", ".ffn.gate_proj."),
    (".mlp.fc3.", ".ffn.up_proj."),
    (".mlp.fc2.", ".ffn.down_proj."),
    (".norm_1.", ".rms_norm1."),
    (".norm_2.", ".rms_norm2."),
    ("head.k.", "head.k_proj."),
    ("head.v.", "head.v_proj."),
    ("head.linear.", "head.output_proj."),
)


def to_transformers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an ml-aim AIMv2 vision state_dict to transformers' Aimv2VisionModel keys."""
    out = {}
    for key, value in sd.items():
        if key == "preprocessor.pos_embed":
            out["embeddings.position_embedding.weight"] = value.squeeze(0)
            continue
        new = key
        for old, repl in _HF_RENAMES:
            new = new.replace(old, repl)
        if new.endswith(".attn.qkv.weight"):
            stem = new.removesuffix("attn.qkv.weight") + "attention."
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{stem}{part}_proj.weight"] = chunk
            continue
        out[new] = value
    return out
