"""The benchmark's plain-MLX baseline is the same model as mlx-aim's: same keys, same loss, same grads."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from configs import TINY_V1, TINY_V2
from mlx.utils import tree_flatten

from mlx_aim.models import build_model
from mlx_aim.objectives.next_patch import next_patch_loss
from mlx_aim.reference import plain_mlx

V1 = {**TINY_V1, "image_size": 32, "patch_size": 8, "num_heads": 2}
V2 = TINY_V2


def _pretrain(encoder: dict) -> dict:
    return {
        "model_type": "aim_pretrain",
        "encoder": encoder,
        "head_blocks": 2,
        "head_width": 48,
    }


def _randomized(model: nn.Module) -> list[tuple[str, mx.array]]:
    """Every parameter drawn at random (norm scales around 1), so no key can be silently ignored."""
    params = tree_flatten(model.parameters())
    out = []
    for i, (name, value) in enumerate(params):
        key = mx.random.key(i)
        if name.endswith("norm.weight") or name.endswith(("norm_1.weight", "norm_2.weight")):
            out.append((name, 1.0 + 0.3 * mx.random.normal(value.shape, key=key)))
        else:
            out.append((name, 0.2 * mx.random.normal(value.shape, key=key)))
    model.load_weights(out)
    return out


def _shared(config: dict, plain_cls):
    ours = build_model(config)
    weights = _randomized(ours)
    plain = plain_cls(config)
    plain.load_weights(weights)  # strict: same key set, same shapes
    return ours, plain


@pytest.mark.parametrize("encoder", [V1, V2], ids=["aim_v1", "aim_v2"])
def test_same_loss_and_gradients_on_shared_weights(encoder):
    config = _pretrain(encoder)
    ours, plain = _shared(config, plain_mlx.AIMForPretraining)
    size, p = encoder["image_size"], encoder["patch_size"]
    images = mx.random.normal((3, size, size, 3))
    k = (size // p) ** 2
    prefix = mx.array([1, k // 2, k - 1], dtype=mx.int32)

    def ours_loss(m):
        return next_patch_loss(m(images, prefix), images, prefix, p)

    def plain_loss(m):
        return plain_mlx.pretraining_loss(m(images, prefix), images, prefix, p)

    loss_a, grads_a = nn.value_and_grad(ours, ours_loss)(ours)
    loss_b, grads_b = nn.value_and_grad(plain, plain_loss)(plain)
    assert loss_a.item() > 0.1
    assert abs(loss_a.item() - loss_b.item()) <= 1e-4
    flat_a, flat_b = dict(tree_flatten(grads_a)), dict(tree_flatten(grads_b))
    assert flat_a.keys() == flat_b.keys()
    for name, g in flat_a.items():
        np.testing.assert_allclose(np.array(flat_b[name]), np.array(g), atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("encoder", [V1, V2], ids=["aim_v1", "aim_v2"])
def test_same_embeddings_on_shared_weights(encoder):
    ours, plain = _shared(encoder, plain_mlx.Encoder)
    images = mx.random.normal((2, encoder["image_size"], encoder["image_size"], 3))
    np.testing.assert_allclose(
        np.array(plain(images)), np.array(ours.encode(images)), atol=1e-4, rtol=1e-4
    )


def test_loss_depends_on_the_weights():
    """Guards the test above: a different head weight gives a different loss."""
    config = _pretrain(V1)
    ours, plain = _shared(config, plain_mlx.AIMForPretraining)
    images = mx.random.normal((2, 32, 32, 3))
    prefix = mx.array([2, 5], dtype=mx.int32)
    before = plain_mlx.pretraining_loss(plain(images, prefix), images, prefix, 8).item()
    plain.head.proj_out.bias = plain.head.proj_out.bias + 0.5
    after = plain_mlx.pretraining_loss(plain(images, prefix), images, prefix, 8).item()
    assert abs(after - before) > 1e-3


def test_additive_mask_matches_the_prefix_causal_rule():
    mask = np.array(plain_mlx.additive_prefix_causal_mask(mx.array([1, 3]), 5))
    for b, s in enumerate([1, 3]):
        for i in range(5):
            for j in range(5):
                assert mask[b, 0, i, j] == (0.0 if (j <= i or j < s) else plain_mlx.MASKED)


def test_plain_model_is_uncompiled_explicit_attention():
    """The baseline must not use the fused SDPA kernel (that is what it is a baseline for)."""
    source = open(plain_mlx.__file__).read()
    assert "scaled_dot_product_attention" not in source
    assert "mx.compile" not in source
