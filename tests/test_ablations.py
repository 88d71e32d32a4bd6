"""The ablation switches of ``mlx-aim train``: what each one changes in the objective."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from configs import TINY_PRETRAIN

from mlx_aim.errors import InputError
from mlx_aim.models import build_model
from mlx_aim.models.layers import patchify, prefix_causal_mask
from mlx_aim.objectives.next_patch import (
    PAPER_VARIANT,
    Variant,
    next_patch_loss,
    next_patch_targets,
    predicted_patches,
)
from mlx_aim.objectives.patch_order import (
    PATCH_ORDERS,
    checkerboard_order,
    patch_order,
    random_order,
    spiral_order,
)
from mlx_aim.train.config import TrainConfig, objective_label, objective_variant
from mlx_aim.train.step import make_train_step, packed_next_patch_loss

# ---- patch orders -----------------------------------------------------------------------------


def test_spiral_of_a_4x4_grid_runs_clockwise_from_the_top_left_inward():
    #  0  1  2  3
    #  4  5  6  7
    #  8  9 10 11
    # 12 13 14 15
    expected = [0, 1, 2, 3, 7, 11, 15, 14, 13, 12, 8, 4, 5, 6, 10, 9]
    assert spiral_order(4, 4).tolist() == expected


def test_spiral_of_a_rectangular_grid():
    assert spiral_order(2, 3).tolist() == [0, 1, 2, 5, 4, 3]
    assert spiral_order(3, 1).tolist() == [0, 1, 2]


def test_checkerboard_is_the_black_squares_then_the_white_ones_each_in_raster_order():
    black = [0, 2, 5, 7, 8, 10, 13, 15]  # (row + col) even
    white = [1, 3, 4, 6, 9, 11, 12, 14]
    assert checkerboard_order(4, 4).tolist() == black + white


def test_random_order_is_fixed_by_the_seed():
    assert random_order(8, 8, seed=3).tolist() == random_order(8, 8, seed=3).tolist()
    assert random_order(8, 8, seed=3).tolist() != random_order(8, 8, seed=4).tolist()


@pytest.mark.parametrize("name", PATCH_ORDERS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (7, 7), (8, 8)])
def test_every_order_is_a_permutation_of_the_grid(name, shape):
    order = patch_order(name, *shape, seed=1)
    assert sorted(order.tolist()) == list(range(shape[0] * shape[1]))


def test_an_unknown_order_is_refused():
    with pytest.raises(ValueError, match="unknown patch order 'zigzag'"):
        patch_order("zigzag", 4, 4)


# ---- targets and attention --------------------------------------------------------------------


def test_raw_pixel_targets_are_the_patches_unnormalized():
    images = mx.random.normal((2, 8, 8, 3), key=mx.random.key(0)) * 3 + 1
    raw = Variant(target="pixels").targets(images, 4)
    np.testing.assert_array_equal(np.array(raw), np.array(patchify(images, 4)))
    normalized = PAPER_VARIANT.targets(images, 4)
    np.testing.assert_array_equal(np.array(normalized), np.array(next_patch_targets(images, 4)))
    assert abs(float(raw.mean(-1).mean())) > 0.5  # raw patches keep their mean; normalized: 0
    assert abs(float(normalized.mean(-1).mean())) < 1e-5


def test_causal_attention_has_no_prefix_and_a_plain_causal_mask():
    prefix = Variant(attention="causal").prefix_lengths(6, 16, paired=True)
    assert prefix.tolist() == [0] * 6
    mask = np.array(prefix_causal_mask(prefix, 5))
    assert (mask == np.tril(np.ones((5, 5), bool))).all()
    sampled = PAPER_VARIANT.prefix_lengths(64, 16, paired=True, key=mx.random.key(1))
    assert int(sampled.min()) >= 1


def test_causal_loss_reads_every_next_patch_prediction_and_never_patch_0():
    rng = np.random.default_rng(0)
    images = mx.array(rng.normal(size=(2, 8, 8, 3)).astype(np.float32))
    predictions = mx.array(rng.normal(size=(2, 4, 48)).astype(np.float32))
    targets = np.array(next_patch_targets(images, 4))
    expected = np.mean((np.array(predictions)[:, :-1] - targets[:, 1:]) ** 2)  # 3 per image
    causal = next_patch_loss(predictions, images, mx.array([0, 0]), 4)
    assert causal.item() == pytest.approx(float(expected), rel=1e-5)
    assert predicted_patches(mx.array([0, 1, 3]), 4).tolist() == [3, 3, 1]


# ---- patch order in the model and the loss ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    mx.random.seed(0)
    model = build_model(TINY_PRETRAIN)  # 16 px, patch 4: a 4x4 grid
    images = mx.random.normal((2, 16, 16, 3), key=mx.random.key(2))
    return model, images


def test_positions_travel_with_their_patches(tiny):
    model, images = tiny
    order = mx.array(spiral_order(4, 4))
    everything = mx.array([16, 16])  # a prefix of every patch: attention without a mask
    permuted = np.array(model.encode(images, everything, order))
    raster = np.array(model.encode(images, everything))
    np.testing.assert_allclose(permuted, raster[:, spiral_order(4, 4)], rtol=1e-4, atol=1e-5)


def test_spiral_loss_pairs_each_prediction_with_the_next_patch_in_spiral_order(tiny):
    model, images = tiny
    spiral = Variant(order=tuple(spiral_order(4, 4).tolist()))
    prefix = mx.array([3, 9])
    predictions = model(images, prefix, spiral.order_index())
    loss = next_patch_loss(predictions, images, prefix, 4, spiral)
    pred, targets = np.array(predictions), np.array(next_patch_targets(images, 4))
    errors = [
        np.mean((pred[b, t - 1] - targets[b, spiral.order[t]]) ** 2)
        for b, s in enumerate(prefix.tolist())
        for t in range(s, 16)  # the patch at spiral step t, predicted at step t - 1
    ]
    assert loss.item() == pytest.approx(float(np.mean(errors)), rel=1e-5)


def test_the_packed_loss_equals_the_plain_loss_in_every_order(tiny):
    model, images = tiny
    prefix = mx.array([5, 11])  # a pair: S and K - S
    for name in ("spiral", "checkerboard", "random"):
        variant = Variant(target="pixels", order=tuple(patch_order(name, 4, 4, 7).tolist()))
        plain = next_patch_loss(
            model(images, prefix, variant.order_index()), images, prefix, 4, variant
        )
        packed = packed_next_patch_loss(model, images, images, prefix, variant=variant)
        assert packed.item() == pytest.approx(plain.item(), rel=1e-5)


@pytest.mark.parametrize(
    "variant", [Variant(attention="causal"), Variant(order=tuple(spiral_order(4, 4).tolist()))]
)
def test_a_training_step_of_each_variant_lowers_its_loss(variant):
    mx.random.seed(0)
    model = build_model(TINY_PRETRAIN)
    optimizer = optim.AdamW(learning_rate=3e-3)
    step = make_train_step(model, optimizer, global_batch=4, variant=variant)
    images = mx.random.normal((4, 16, 16, 3), key=mx.random.key(5))
    losses = [step([images])[0].item() for _ in range(8)]
    assert losses[-1] < losses[0]


# ---- settings ---------------------------------------------------------------------------------


def test_the_default_settings_are_the_papers_and_raster_permutes_nothing():
    encoder = build_model(TINY_PRETRAIN).encoder.args
    assert objective_variant(TrainConfig(), encoder) == PAPER_VARIANT
    spiral = objective_variant(TrainConfig(patch_order="spiral"), encoder)
    assert spiral.order == tuple(spiral_order(4, 4).tolist())
    seeded = [objective_variant(TrainConfig(patch_order="random", seed=s), encoder) for s in (0, 1)]
    assert seeded[0].order != seeded[1].order  # one fixed permutation per run, from its seed


def test_previews_and_the_loss_curve_name_the_switches():
    assert (
        objective_label(TrainConfig()) == "norm-pixels, prefix attention, raster order, crop 0.4-1"
    )
    changed = TrainConfig(target="pixels", attention="causal", patch_order="spiral", head_blocks=1)
    assert objective_label(changed) == (
        "pixels, causal attention, spiral order, crop 0.4-1, 1 head block"
    )


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("target", "rgb", "--target must be one of norm-pixels, pixels, got 'rgb'"),
        ("attention", "full", "--attention must be one of prefix, causal"),
        ("patch_order", "zigzag", "--patch-order must be one of raster, spiral"),
        ("probe_every", -1, "--probe-every must be in"),
    ],
)
def test_invalid_switches_are_refused(flag, value, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**{flag: value}).validate()
