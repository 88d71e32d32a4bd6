"""The compiled training step, the optimizer groups and the learning-rate schedule."""

import math

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_PRETRAIN
from mlx.utils import tree_flatten, tree_unflatten

from mlx_aim.models import build_model
from mlx_aim.train.optim import build_optimizer, decays, warmup_cosine
from mlx_aim.train.step import make_train_step

TINY = {**TINY_PRETRAIN, "head_width": 64}


def fixed_batch(n: int = 8, seed: int = 0) -> mx.array:
    """Blocky images with a little noise: learnable, but not trivially flat patches."""
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.normal(size=(n, 4, 4, 3)), np.ones((1, 4, 4, 1)))
    return mx.array((blocks + 0.3 * rng.normal(size=(n, 16, 16, 3))).astype(np.float32))


def setup(lr=3e-3, steps=100, **step_kwargs):
    """A tiny model and its compiled step over batches of 8."""
    mx.random.seed(0)
    model = build_model(TINY)
    optimizer = build_optimizer(model, warmup_cosine(lr, 10, steps, 1e-5), weight_decay=0.05)
    return model, make_train_step(model, optimizer, global_batch=8, **step_kwargs)


def test_overfitting_a_fixed_batch_halves_the_loss():
    _, step = setup(steps=120)
    x = fixed_batch()
    losses = [step([x])[0].item() for _ in range(120)]
    assert np.mean(losses[-10:]) < 0.5 * losses[0], (losses[0], losses[-10:])


def test_schedule_warms_up_linearly_then_decays_to_the_minimum():
    schedule = warmup_cosine(1e-3, 10, 110, 1e-5)
    lr = [schedule(mx.array(s)).item() for s in range(120)]
    assert lr[0] == pytest.approx(1e-4) and lr[4] == pytest.approx(5e-4)
    assert lr[9] == pytest.approx(1e-3) and lr[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))  # monotone decay
    cosine = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 50 / 99))  # 50 of 99 decay steps
    assert lr[60] == pytest.approx(cosine, rel=1e-5)
    assert lr[109] == pytest.approx(1e-5) and lr[119] == pytest.approx(1e-5)


def test_weight_decay_skips_norms_biases_and_position_embeddings():
    trunk = {
        "model_type": "aim_v2",
        "image_size": 16,
        "patch_size": 4,
        "embed_dim": 32,
        "num_blocks": 1,
        "num_heads": 2,
        "mlp_hidden_dim": 64,
    }
    model = build_model({**TINY, "encoder": trunk})
    decayed = {k for k, v in tree_flatten(model.parameters()) if decays(k, v)}
    assert "encoder.preprocessor.pos_embed" not in decayed
    assert "encoder.preprocessor.patchifier.proj.weight" in decayed
    assert "encoder.preprocessor.patchifier.proj.bias" not in decayed
    assert "encoder.trunk.blocks.0.attn.qkv.weight" in decayed
    assert "encoder.trunk.blocks.0.norm_1.weight" not in decayed
    assert "head.proj_out.weight" in decayed and "head.proj_out.bias" not in decayed
    assert "head.norm.weight" not in decayed


def test_a_zero_gradient_step_decays_only_the_decayed_group():
    model = build_model(TINY)
    optimizer = build_optimizer(model, lambda step: mx.array(0.1), weight_decay=0.5)
    before = dict(tree_flatten(model.parameters()))
    zeros = {k: mx.zeros_like(v) for k, v in before.items()}
    optimizer.update(model, tree_unflatten(list(zeros.items())))
    after = dict(tree_flatten(model.parameters()))
    weight = "encoder.trunk.blocks.0.mlp.fc1.weight"
    assert mx.allclose(after[weight], before[weight] * (1 - 0.1 * 0.5)).item()
    for key in ("encoder.trunk.blocks.0.norm_1.weight", "head.proj_out.bias"):
        assert mx.array_equal(after[key], before[key]).item()


def test_activation_checkpointing_gives_the_same_updates():
    x = fixed_batch()
    results = []
    for checkpoint in (False, True):
        model, step = setup()
        model.encoder.trunk.checkpoint_blocks = checkpoint
        for _ in range(3):
            step([x])
        results.append(dict(tree_flatten(model.parameters())))
    for key, value in results[0].items():
        assert mx.allclose(value, results[1][key], atol=1e-6).item(), key


def test_paired_and_independent_prefixes_both_train():
    x = fixed_batch()
    for paired in (True, False):
        model, step = setup(paired_prefixes=paired)
        losses = [step([x])[0].item() for _ in range(40)]
        assert losses[-1] < 0.7 * losses[0], (paired, losses[0], losses[-1])


def test_bfloat16_computes_in_bf16_but_keeps_float32_masters():
    x = fixed_batch()
    model32, step32 = setup()
    model16, step16 = setup(compute_dtype=mx.bfloat16)
    losses32 = [step32([x])[0].item() for _ in range(5)]
    losses16 = [step16([x])[0].item() for _ in range(5)]
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model16.parameters()))
    assert np.allclose(losses16, losses32, rtol=0.05), (losses16, losses32)
    assert losses16 != losses32  # really computed in bfloat16


def test_accumulated_micro_batches_make_one_update():
    mx.random.seed(0)
    model = build_model(TINY)
    optimizer = build_optimizer(model, warmup_cosine(1e-3, 1, 10, 1e-5), weight_decay=0.05)
    step = make_train_step(model, optimizer, global_batch=4)
    x = fixed_batch()
    loss, norm = step([x[:4], x[4:]])
    assert np.isfinite(loss.item()) and norm.item() > 0
    assert [o.state["step"].item() for o in optimizer.optimizers] == [1, 1]
