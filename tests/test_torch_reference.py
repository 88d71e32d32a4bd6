"""The PyTorch reference against transformers' Aimv2VisionModel and hand-computed values."""

import math

import numpy as np
import pytest
import torch
from parity import assert_parity
from transformers import Aimv2VisionConfig, Aimv2VisionModel

from mlx_aim.reference.torch_aim import (
    REFERENCE_ARCHS,
    AIMForPretrainingTorch,
    AIMv1Torch,
    AIMv2VisionTorch,
    aim_pretraining_loss_torch,
    build_reference,
    expected_state_dict_shapes,
    init_random_,
    prefix_causal_mask,
    sincos_pos_embed,
    to_transformers_state_dict,
)

DIM, HEADS, BLOCKS, HIDDEN, PATCH = 32, 4, 2, 48, 7
erf = np.vectorize(math.erf)


def _pair_with_transformers(pos_embed_type: str, head: str | None):
    ref = AIMv2VisionTorch(
        28, PATCH, DIM, BLOCKS, HEADS, HIDDEN, pos_embed_type=pos_embed_type, head=head
    )
    init_random_(ref, seed=0, std=0.1).eval()
    config = Aimv2VisionConfig(
        hidden_size=DIM,
        intermediate_size=HIDDEN,
        num_hidden_layers=BLOCKS,
        num_attention_heads=HEADS,
        image_size=28,
        patch_size=PATCH,
        use_head=head is not None,
        is_native=pos_embed_type == "sincos",
    )
    hf = Aimv2VisionModel(config).eval()
    hf.load_state_dict(to_transformers_state_dict(ref.state_dict()), strict=True)
    return ref, hf


@torch.no_grad()
def test_aimv2_absolute_positions_match_transformers():
    ref, hf = _pair_with_transformers("absolute", None)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    expected = hf(pixel_values=x).last_hidden_state
    assert ref(x).shape == (2, 16, DIM)
    assert_parity(ref(x), expected)


@torch.no_grad()
def test_aimv2_native_sincos_matches_transformers_on_non_square_input():
    ref, hf = _pair_with_transformers("sincos", None)
    x = torch.randn(2, 3, 28, 49, generator=torch.Generator().manual_seed(2))
    expected = hf(pixel_values=x).last_hidden_state
    assert ref(x).shape == (2, 4 * 7, DIM)
    assert_parity(ref(x), expected)


@torch.no_grad()
def test_aimv2_lit_attention_pool_head_matches_transformers_pooler():
    ref, hf = _pair_with_transformers("absolute", "attention-pool")
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    expected = hf(pixel_values=x).pooler_output
    assert ref(x).shape == (3, DIM)
    assert_parity(ref(x), expected)


def test_sincos_table_columns_first_then_rows():
    table = sincos_pos_embed(3, 5, 8)
    row, col = 2, 3
    omega = np.array([1.0, 1.0 / 100.0])  # 1 / 10000 ** (i / 2), i = 0, 1
    expected = np.concatenate(
        [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
    )
    assert table.shape == (15, 8)
    np.testing.assert_allclose(table[row * 5 + col].numpy(), expected, atol=1e-7)


def test_prefix_causal_mask_by_hand():
    mask = prefix_causal_mask(torch.tensor([1, 3]), 4)
    causal = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    prefix3 = [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == causal
    assert mask[1, 0].int().tolist() == prefix3


def _numpy_loss(pred, images, prefix, p, eps):
    """Loops over patches, pixels in (row, col, channel) order; unbiased per-patch variance."""
    b_count, c_count, h, w = images.shape
    total, count = 0.0, 0
    for b in range(b_count):
        patches = []
        for r in range(h // p):
            for c in range(w // p):
                vals = [
                    images[b, ch, r * p + i, c * p + j]
                    for i in range(p)
                    for j in range(p)
                    for ch in range(c_count)
                ]
                patches.append(np.array(vals, dtype=np.float64))
        for t in range(1, len(patches)):
            if t < prefix[b]:
                continue
            x = patches[t]
            target = (x - x.mean()) / np.sqrt(x.var(ddof=1) + eps)
            total += np.mean((pred[b, t - 1] - target) ** 2)
            count += 1
    return total / count


def test_loss_matches_numpy_loops_on_two_by_two_patches():
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(2, 2, 4, 4, generator=gen)  # K = 4 patches of 2*2*2 = 8 values
    pred = torch.randn(2, 4, 8, generator=gen)
    prefix = torch.tensor([1, 3])
    loss = aim_pretraining_loss_torch(pred, images, prefix, patch_size=2)
    expected = _numpy_loss(pred.numpy(), images.numpy(), [1, 3], 2, 1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_of_zero_prediction_is_n_minus_1_over_n_with_unbiased_variance():
    images = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    loss = aim_pretraining_loss_torch(torch.zeros(1, 4, 4), images, torch.tensor([1]), 2, eps=0.0)
    assert loss.item() == pytest.approx(3 / 4, rel=1e-6)


def test_loss_reads_patch_pixels_in_row_col_channel_order():
    images = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(6))

    def normalized(values):
        return (values - values.mean()) / np.sqrt(values.var(ddof=1) + 1e-6)

    img = images[0].numpy()
    hwc, chw = [], []
    for r, c in [(0, 1), (1, 0), (1, 1)]:  # patches 1..3 are the targets of preds 0..2
        block = img[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2]
        hwc.append(normalized(block.transpose(1, 2, 0).reshape(-1)))
        chw.append(normalized(block.reshape(-1)))
    pad = np.zeros((1, 12))
    good = torch.tensor(np.concatenate([np.stack(hwc), pad])[None], dtype=torch.float32)
    wrong = torch.tensor(np.concatenate([np.stack(chw), pad])[None], dtype=torch.float32)
    prefix = torch.tensor([1])
    assert aim_pretraining_loss_torch(good, images, prefix, 2).item() < 1e-10
    assert aim_pretraining_loss_torch(wrong, images, prefix, 2).item() > 0.1


def test_loss_ignores_prefix_targets_and_the_last_prediction():
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(1, 1, 4, 4, generator=gen)
    pred = torch.randn(1, 4, 4, generator=gen)
    prefix = torch.tensor([3])  # only target t = 3 (pred 2) counts
    base = aim_pretraining_loss_torch(pred, images, prefix, 2)
    changed = pred.clone()
    changed[0, [0, 1, 3]] += 5.0
    assert aim_pretraining_loss_torch(changed, images, prefix, 2) == base
    changed[0, 2] += 5.0
    assert aim_pretraining_loss_torch(changed, images, prefix, 2) != base


def _pretraining_model(encoder):
    return init_random_(AIMForPretrainingTorch(encoder, head_blocks=2, head_width=24), 8, std=0.2)


@pytest.mark.parametrize(
    "encoder",
    [
        AIMv1Torch(28, PATCH, DIM, BLOCKS, HEADS),
        AIMv2VisionTorch(28, PATCH, DIM, BLOCKS, HEADS, HIDDEN),
    ],
    ids=["aimv1", "aimv2"],
)
@torch.no_grad()
def test_pretraining_is_prefix_causal_in_every_block(encoder):
    model = _pretraining_model(encoder).eval()
    gen = torch.Generator().manual_seed(9)
    images = torch.randn(1, 3, 28, 28, generator=gen)
    prefix = torch.tensor([5])
    pred = model(images, prefix)
    assert pred.shape == (1, 16, PATCH * PATCH * 3)

    later = images.clone()
    later[:, :, 14:21, 14:21] += 1.0  # patch 10 (row 2, col 2)
    diff = (model(later, prefix) - pred).abs().amax(dim=-1)[0]
    assert diff[:10].max() == 0.0
    assert diff[10:].min() > 1e-4

    in_prefix = images.clone()
    in_prefix[:, :, 0:7, 21:28] += 1.0  # patch 3 lies in the prefix [0, 5)
    diff = (model(in_prefix, prefix) - pred).abs().amax(dim=-1)[0]
    assert diff.min() > 1e-4


def _layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * weight + bias


@torch.no_grad()
def test_pixel_head_follows_the_design_formula():
    model = _pretraining_model(AIMv2VisionTorch(28, PATCH, DIM, BLOCKS, HEADS, HIDDEN)).eval()
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(13))
    full_prefix = torch.tensor([16, 16])  # every key visible: the plain bidirectional encoder
    pred = model(images, full_prefix).numpy()
    sd = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}

    z = model.encoder(images).numpy().astype(np.float64) + sincos_pos_embed(4, 4, DIM).numpy()
    h = z @ sd["head.proj_in.weight"].T
    for i in range(2):
        n = _layer_norm(h, sd[f"head.blocks.{i}.norm.weight"], sd[f"head.blocks.{i}.norm.bias"])
        a = n @ sd[f"head.blocks.{i}.mlp.fc1.weight"].T
        h = h + (0.5 * a * (1 + erf(a / np.sqrt(2)))) @ sd[f"head.blocks.{i}.mlp.fc2.weight"].T
    h = _layer_norm(h, sd["head.norm.weight"], sd["head.norm.bias"])
    expected = h @ sd["head.proj_out.weight"].T + sd["head.proj_out.bias"]
    assert_parity(pred, expected)


def test_pretraining_state_dict_keys_and_shapes():
    model = AIMForPretrainingTorch(AIMv1Torch(28, PATCH, DIM, 1, HEADS), 2, 24, head_mlp_ratio=4)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = {k: v for k, v in shapes.items() if k.startswith("head.")}
    assert head == {
        "head.proj_in.weight": (24, DIM),
        "head.blocks.0.norm.weight": (24,),
        "head.blocks.0.norm.bias": (24,),
        "head.blocks.0.mlp.fc1.weight": (96, 24),
        "head.blocks.0.mlp.fc2.weight": (24, 96),
        "head.blocks.1.norm.weight": (24,),
        "head.blocks.1.norm.bias": (24,),
        "head.blocks.1.mlp.fc1.weight": (96, 24),
        "head.blocks.1.mlp.fc2.weight": (24, 96),
        "head.norm.weight": (24,),
        "head.norm.bias": (24,),
        "head.proj_out.weight": (PATCH * PATCH * 3, 24),
        "head.proj_out.bias": (PATCH * PATCH * 3,),
    }
    assert "encoder.trunk.blocks.0.attn.qkv.weight" in shapes
    with pytest.raises(ValueError, match="without a classifier head"):
        AIMForPretrainingTorch(AIMv1Torch(28, PATCH, DIM, 1, HEADS, num_classes=3), 1, 24)


@torch.no_grad()
def test_aimv1_probe_uses_running_stats_and_mean_of_probe_layers():
    model = AIMv1Torch(28, PATCH, DIM, 3, HEADS, num_classes=5, probe_layers=(0, 2))
    init_random_(model, seed=10, std=0.1).eval()
    x = torch.randn(2, 3, 28, 35, generator=torch.Generator().manual_seed(11))
    feats = [f.numpy().astype(np.float64) for f in model.extract_features(x)]
    sd = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}

    h = (feats[0] + feats[2]) / 2
    h = (h - sd["head.bn.running_mean"]) / np.sqrt(sd["head.bn.running_var"] + 1e-6)
    hd = DIM // HEADS
    q = sd["head.cls_token"].reshape(HEADS, hd)
    k = (h @ sd["head.k.weight"].T).reshape(2, -1, HEADS, hd)
    v = (h @ sd["head.v.weight"].T).reshape(2, -1, HEADS, hd)
    scores = np.einsum("hd,bnhd->bhn", q, k) / np.sqrt(hd)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    pooled = np.einsum("bhn,bnhd->bhd", attn, v).reshape(2, DIM)
    expected = pooled @ sd["head.linear.weight"].T

    assert_parity(model(x), expected)
    assert model.probe_layers == (0, 2)
    assert AIMv1Torch(28, PATCH, DIM, 8, HEADS).probe_layers == (2, 3, 4, 5, 6, 7)
    assert len(model.extract_features(x, max_block_id=1)) == 2


def test_init_random_fills_every_tensor_reproducibly():
    def build():
        return AIMv1Torch(28, PATCH, DIM, 1, HEADS, num_classes=3)

    a = init_random_(build(), seed=12)
    b = init_random_(build(), seed=12)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
        assert value.unique().numel() == value.numel() or value.numel() == 1, key
        assert not torch.all(value == 0) and not torch.all(value == 1), key
    assert a.state_dict()["head.bn.running_var"].min() > 0


def test_expected_shapes_match_a_real_tiny_model():
    arch = dict(model_type="aimv2", image_size=28, patch_size=PATCH, embed_dim=DIM, num_blocks=1)
    arch.update(num_heads=HEADS, mlp_hidden_dim=HIDDEN, head="attention-pool")
    real = {k: tuple(v.shape) for k, v in build_reference(arch).state_dict().items()}
    assert expected_state_dict_shapes(arch) == real


def test_expected_shapes_of_released_architectures_without_allocating():
    aim7b = expected_state_dict_shapes(REFERENCE_ARCHS["aim-7B"], layout="mlx")
    assert len(aim7b) == 32 * 8 + 4 + 2 + 6
    assert aim7b["preprocessor.patchifier.proj.weight"] == (4096, 14, 14, 3)
    assert aim7b["trunk.blocks.31.attn.qkv.weight"] == (3 * 4096, 4096)
    assert aim7b["trunk.blocks.31.mlp.fc1.weight"] == (4 * 4096, 4096)
    assert aim7b["head.linear.weight"] == (1000, 4096)
    assert aim7b["head.bn.running_var"] == (4096,)
    assert "head.bn.num_batches_tracked" not in aim7b

    large = expected_state_dict_shapes(REFERENCE_ARCHS["aimv2-large-patch14-224"])
    assert len(large) == 173
    assert large["preprocessor.pos_embed"] == (1, 256, 1024)
    assert large["preprocessor.patchifier.proj.weight"] == (1024, 3, 14, 14)
    assert large["trunk.blocks.0.mlp.fc3.weight"] == (2816, 1024)
    native = expected_state_dict_shapes(REFERENCE_ARCHS["aimv2-large-patch14-native"])
    assert set(large) - set(native) == {"preprocessor.pos_embed"}
