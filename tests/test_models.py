"""Model semantics: attention masks, positions, shapes, block features, classifier wiring."""

import math

import configs
import mlx.core as mx
import numpy as np
import pytest

from mlx_aim.models import build_model
from mlx_aim.models.layers import patchify, prefix_causal_mask, sincos_pos_embed

TINY_V1 = {**configs.TINY_V1, "image_size": 32, "patch_size": 8, "num_blocks": 3}
TINY_V2 = configs.TINY_V2


def test_prefix_causal_mask_matches_definition():
    mask = np.array(prefix_causal_mask(mx.array([1, 3]), 5))
    assert mask.shape == (2, 1, 5, 5)
    for b, s in enumerate([1, 3]):
        for i in range(5):
            for j in range(5):
                assert mask[b, 0, i, j] == (j <= i or j < s), (b, i, j)


def test_prefix_of_one_is_plain_causal_and_full_prefix_is_bidirectional():
    causal = np.tril(np.ones((4, 4), bool))
    assert (np.array(prefix_causal_mask(mx.array([1]), 4))[0, 0] == causal).all()
    assert np.array(prefix_causal_mask(mx.array([4]), 4)).all()


def test_prefix_tokens_do_not_see_later_tokens():
    model = build_model(TINY_V1)
    x = mx.random.normal((1, 32, 32, 3))
    tokens = model.preprocessor(x)
    mask = prefix_causal_mask(mx.array([6]), tokens.shape[1])
    base = model.trunk(tokens, mask)
    # Changing patch 10 must leave every output before position 10 unchanged (causal part) ...
    changed = tokens.at[:, 10].add(5.0)
    out = model.trunk(changed, mask)
    diff = np.abs(np.array(out - base)).max(axis=-1)[0]
    assert diff[:10].max() == 0 and diff[10] > 0
    # ... while changing a prefix patch changes every position, earlier ones included.
    out = model.trunk(tokens.at[:, 4].add(5.0), mask)
    assert (np.abs(np.array(out - base)).max(axis=-1)[0] > 0).all()


def test_sincos_layout_is_sin_col_cos_col_sin_row_cos_row():
    table = np.array(sincos_pos_embed(2, 3, 8))
    omega = 1.0 / 10000 ** (np.arange(2) / 2)
    for n in range(6):
        row, col = divmod(n, 3)
        expected = np.concatenate(
            [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
        )
        np.testing.assert_allclose(table[n], expected, atol=1e-6)


def test_patchify_is_raster_order_with_row_col_channel_pixels():
    img = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    patches = np.array(patchify(mx.array(img), 2))
    assert patches.shape == (2, 6, 12)
    # patch 4 is grid row 1, column 1: pixels rows 2-3, cols 2-3
    np.testing.assert_array_equal(patches[1, 4], img[1, 2:4, 2:4, :].reshape(-1))


def test_patch_embedding_equals_strided_convolution():
    model = build_model(TINY_V1)
    x = mx.random.normal((2, 32, 32, 3))
    conv = model.preprocessor.patchifier.proj(x).reshape(2, 16, -1)
    expected = model.preprocessor.patchifier.norm(conv)
    np.testing.assert_allclose(model.preprocessor.patchifier(x), expected, atol=1e-5)


@pytest.mark.parametrize("config", [TINY_V1, TINY_V2])
def test_extract_features_stops_at_max_block(config):
    model = build_model(config)
    x = mx.random.normal((2, config["image_size"], config["image_size"], 3))
    all_features = model.extract_features(x)
    assert len(all_features) == config["num_blocks"]
    first = model.extract_features(x, max_block_id=0)
    assert len(first) == 1
    np.testing.assert_allclose(first[0], all_features[0], atol=1e-6)
    with pytest.raises(ValueError, match="max_block_id"):
        model.extract_features(x, max_block_id=config["num_blocks"])


def test_v1_classifier_averages_probe_layers_and_returns_logits():
    model = build_model({**TINY_V1, "num_classes": 7, "probe_layers": [0, 1]})
    model.eval()
    x = mx.random.normal((2, 32, 32, 3))
    logits = model(x)
    assert logits.shape == (2, 7)
    features = model.extract_features(x)
    pooled = (features[0] + features[1]) / 2
    np.testing.assert_allclose(logits, model.head(pooled), atol=1e-5)


def test_v1_classifier_default_probe_layers_are_last_six():
    model = build_model({**TINY_V1, "num_blocks": 8, "num_classes": 3})
    assert model.args.feature_layers == [2, 3, 4, 5, 6, 7]


def test_v2_absolute_positions_reject_other_resolutions():
    model = build_model(TINY_V2)
    with pytest.raises(ValueError, match="learned positions for 4 patches"):
        model(mx.random.normal((1, 42, 28, 3)))


def test_v2_native_accepts_non_square_images():
    model = build_model({**TINY_V2, "pos_embed_type": "sincos"})
    assert model(mx.random.normal((1, 28, 70, 3))).shape == (1, 10, 32)


def test_activation_checkpointing_keeps_gradients_identical():
    import mlx.nn as nn

    model = build_model(TINY_V1)
    x = mx.random.normal((2, 32, 32, 3))

    def loss(m):
        return m(x).square().mean()

    g1 = nn.value_and_grad(model, loss)(model)[1]
    model.trunk.checkpoint_blocks = True
    g2 = nn.value_and_grad(model, loss)(model)[1]
    from mlx.utils import tree_flatten

    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=k)


def test_parameter_count_of_aim_nano_is_as_documented():
    from mlx.utils import tree_flatten

    from mlx_aim.checkpoints.registry import get_entry

    model = build_model(get_entry("aim-nano").config)
    count = sum(v.size for _, v in tree_flatten(model.parameters()))
    d, blocks, p = 128, 4, 4
    per_block = 4 * d + 3 * d * d + d * d + 2 * 4 * d * d  # 2 LayerNorms, qkv, proj, MLP
    expected = d * p * p * 3 + d + 2 * d + blocks * per_block + 2 * d
    assert count == expected
    assert math.isclose(count / 1e6, 0.80, abs_tol=0.01)


@pytest.mark.parametrize("config", [TINY_V1, TINY_V2])
def test_linear_probe_classifier_pools_the_token_mean(config):
    model = build_model({**config, "num_classes": 4, "probe_layers": [1], "head": "linear"})
    model.eval()
    x = mx.random.normal((3, config["image_size"], config["image_size"], 3))
    feature = model.extract_features(x)[1].mean(axis=1)
    np.testing.assert_allclose(model(x), model.head.linear(model.head.bn(feature)), atol=1e-5)


@pytest.mark.parametrize("config", [TINY_V1, TINY_V2])
def test_a_config_written_with_the_former_classifier_field_loads_its_head(config):
    old = build_model({**config, "num_classes": 4, "probe_layers": [1], "classifier": "linear"})
    assert old.args.head == "linear" and "classifier" not in old.args.to_dict()
    assert type(old.head).__name__ == "LinearClassifier"


def test_v2_encoder_accepts_an_attentive_probe_classifier():
    model = build_model({**TINY_V2, "num_classes": 5, "probe_layers": [0, 1]})
    assert model(mx.random.normal((2, 28, 28, 3))).shape == (2, 5)
