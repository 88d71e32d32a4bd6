"""The pre-training objective, checked on cases computed by hand."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_aim.checkpoints.registry import pretrain_config
from mlx_aim.models import build_model
from mlx_aim.objectives.next_patch import (
    next_patch_loss,
    next_patch_targets,
    normalize_patches,
    sample_paired_prefix_lengths,
    sample_prefix_lengths,
)
from mlx_aim.train.step import packed_next_patch_loss, packed_prediction_index


def test_patch_normalization_uses_unbiased_variance_and_eps():
    patch = np.array([[[1.0, 2.0, 3.0, 6.0]]], np.float32)
    mean, var = 3.0, ((4 + 1 + 0 + 9) / 3)  # ddof=1
    expected = (patch - mean) / np.sqrt(var + 1e-6)
    np.testing.assert_allclose(normalize_patches(mx.array(patch)), expected, rtol=1e-6)


def test_constant_patch_normalizes_to_zero_not_nan():
    out = np.array(normalize_patches(mx.full((1, 1, 12), 0.7)))
    assert np.isfinite(out).all() and np.abs(out).max() < 1e-3


def _hand_loss(pred, images, prefix, p):
    b, h, w, c = images.shape
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, -1, p * p * c).astype(np.float64)
    mean = patches.mean(-1, keepdims=True)
    var = patches.var(-1, ddof=1, keepdims=True)
    target = (patches - mean) / np.sqrt(var + 1e-6)
    total, count = 0.0, 0
    for i in range(b):
        for t in range(prefix[i], patches.shape[1]):  # targets t >= S, predicted at t - 1
            total += ((pred[i, t - 1] - target[i, t]) ** 2).mean()
            count += 1
    return total / count


def test_loss_is_shift_by_one_and_skips_prefix_targets():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 4, 6, 3)).astype(np.float32)  # 2x3 patches of 2 px
    pred = rng.normal(size=(2, 6, 12)).astype(np.float32)
    prefix = [1, 4]
    loss = next_patch_loss(mx.array(pred), mx.array(images), mx.array(prefix), 2)
    assert loss.item() == pytest.approx(_hand_loss(pred, images, prefix, 2), rel=1e-5)


def test_perfect_next_patch_prediction_has_zero_loss():
    images = mx.random.normal((2, 8, 8, 3))
    targets = next_patch_targets(images, 4)
    pred = mx.concatenate([targets[:, 1:], mx.zeros_like(targets[:, :1])], axis=1)
    loss = next_patch_loss(pred, images, mx.array([1, 3]), 4)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_errors_on_prefix_targets_do_not_count():
    images = mx.random.normal((1, 8, 8, 3))
    targets = next_patch_targets(images, 4)
    pred = mx.concatenate([targets[:, 1:], mx.zeros_like(targets[:, :1])], axis=1)
    spoiled = pred.at[:, 0].add(100.0)  # predicts target 1, inside a prefix of length 2
    assert next_patch_loss(spoiled, images, mx.array([2]), 4).item() == pytest.approx(0, abs=1e-10)
    assert next_patch_loss(spoiled, images, mx.array([1]), 4).item() > 1.0


def test_prefix_lengths_cover_one_to_k_minus_one_uniformly():
    s = np.array(sample_prefix_lengths(20000, 5, key=mx.random.key(1)))
    assert s.min() == 1 and s.max() == 4
    counts = np.bincount(s, minlength=5)[1:]
    assert np.all(np.abs(counts / len(s) - 0.25) < 0.02)
    with pytest.raises(ValueError):
        sample_prefix_lengths(2, 1)


def test_paired_prefix_lengths_are_each_uniform_and_sum_to_k_per_pair():
    s = np.array(sample_paired_prefix_lengths(20001, 5, key=mx.random.key(2)))
    assert len(s) == 20001 and s.min() == 1 and s.max() == 4
    assert np.all(s[0:-1:2] + s[1::2] == 5)
    for half in (s[0::2], s[1::2]):  # each image's length is uniform on {1, ..., K-1}
        counts = np.bincount(half, minlength=5)[1:]
        assert np.all(np.abs(counts / len(half) - 0.25) < 0.02)


def _loss_positions(prefix, k, first):
    """{(global image, position)} whose predictions the loss reads, by brute force."""
    return {(first + b, t - 1) for b, s in enumerate(prefix) for t in range(s, k)}


@pytest.mark.parametrize("first", [0, 1, 2, 5])
@pytest.mark.parametrize("batch", [1, 2, 3, 6])
def test_packed_index_lists_exactly_the_positions_the_loss_reads(first, batch):
    k = 7
    everything = np.array(sample_paired_prefix_lengths(first + batch, k, key=mx.random.key(3)))
    prefix = everything[first:]
    token, weight = packed_prediction_index(mx.array(prefix), k, first=first)
    token, weight = np.array(token), np.array(weight)
    rows = len({(first + b) // 2 for b in range(batch)})  # one row per pair seen in this slice
    assert token.shape == weight.shape == (rows * k,)
    read = [(first + i // k, i % k) for i in token[weight == 1]]
    assert len(read) == len(set(read))
    assert set(read) == _loss_positions(prefix, k, first)
    assert np.all(token[weight == 0] == 0) and set(np.unique(weight)) <= {0.0, 1.0}
    if first % 2 == 0 and batch % 2 == 0:  # whole pairs only: every row is full
        assert weight.all()


def test_packed_loss_and_gradients_equal_the_full_computation():
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model = build_model(pretrain_config("aim-nano", head_blocks=2, head_width=32))
    images = mx.random.normal((3, 32, 32, 3))
    prefix = sample_paired_prefix_lengths(3, 64, key=mx.random.key(4))
    token, weight = packed_prediction_index(prefix, 64)

    def full(m):
        return next_patch_loss(m(images, prefix), images, prefix, 4)

    def packed(m):
        return packed_next_patch_loss(m, images, images, prefix)

    loss, grads = nn.value_and_grad(model, full)(model)
    packed_loss, packed_grads = nn.value_and_grad(model, packed)(model)
    assert token.shape == weight.shape == (2 * 64,)  # the head runs on 2 rows of K, not 3
    assert packed_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for (key, a), (_, b) in zip(tree_flatten(grads), tree_flatten(packed_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=key)


def test_pretraining_predictions_do_not_depend_on_future_patches():
    model = build_model(pretrain_config("aim-nano", head_blocks=1, head_width=32))
    images = mx.random.normal((1, 32, 32, 3))
    prefix = mx.array([3])
    base = model(images, prefix)
    # Patch 20 (row 2, col 4) changes only predictions at positions >= 20.
    changed = images.at[:, 8:12, 16:20].add(3.0)
    diff = np.abs(np.array(model(changed, prefix) - base)).max(axis=-1)[0]
    assert diff[:20].max() == 0 and diff[20:].min() > 0
    assert base.shape == (1, 64, 4 * 4 * 3)


def test_grad_checkpointing_of_trunk_and_head_keeps_gradients():
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model = build_model(pretrain_config("aim-nano", head_blocks=2, head_width=32))
    images, prefix = mx.random.normal((2, 32, 32, 3)), mx.array([5, 40])

    def loss(m):
        return next_patch_loss(m(images, prefix), images, prefix, 4)

    reference = nn.value_and_grad(model, loss)(model)[1]
    model.set_grad_checkpoint(True)
    assert model.head.checkpoint_blocks and model.encoder.trunk.checkpoint_blocks
    checkpointed = nn.value_and_grad(model, loss)(model)[1]
    for (key, a), (_, b) in zip(tree_flatten(reference), tree_flatten(checkpointed), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=key)
