"""Previews, the loss curve and ``metrics.jsonl`` (pictures are checked by their pixels)."""

import json

import mlx.core as mx
import numpy as np
from PIL import ImageDraw, ImageFont

from mlx_aim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from mlx_aim.objectives.next_patch import normalize_patches
from mlx_aim.train.report import (
    MetricsLog,
    Reporter,
    log_ticks,
    loss_curve_image,
    patchify_np,
    prediction_panels,
    preview_image,
    unpatchify,
    wrap_text,
)


def test_patchify_and_unpatchify_invert_each_other():
    image = np.random.default_rng(0).normal(size=(12, 12, 3)).astype(np.float32)
    patches = patchify_np(image, 4)
    assert patches.shape == (9, 48)
    assert np.array_equal(patches[1], image[0:4, 4:8].reshape(-1))  # raster order
    assert np.array_equal(unpatchify(patches, 3, 4), image)


def test_perfect_next_patch_predictions_reproduce_the_truth():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(16, 16, 3)).astype(np.float32)
    targets = np.array(normalize_patches(mx.array(patchify_np(image, 4))))
    predictions = np.concatenate([targets[1:], np.zeros_like(targets[:1])])  # k predicts k + 1
    prefix, predicted, truth = prediction_panels(
        image, predictions, 5, 4, IMAGENET_MEAN, IMAGENET_STD
    )
    assert np.array_equal(truth, denormalize(image, IMAGENET_MEAN, IMAGENET_STD))
    assert np.abs(predicted.astype(int) - truth.astype(int)).max() <= 1
    assert (patchify_np(prefix, 4)[5:] == 128).all()  # patches after the prefix are grey
    assert np.array_equal(patchify_np(prefix, 4)[:5], patchify_np(truth, 4)[:5])


def test_a_preview_has_one_row_per_image_and_four_columns():
    images = np.zeros((3, 16, 16, 3), np.float32)
    image = preview_image(
        images, np.zeros((3, 16, 48)), 8, 4, IMAGENET_MEAN, IMAGENET_STD, [None] * 3, "t", 64
    )
    assert image.size == (8 + 4 * 72, 40 + 3 * 72 + 8)


def test_a_long_preview_caption_is_wrapped_inside_the_image():
    caption = "three large purple triangles and a small yellow circle on the left " * 3
    captions = [f"{caption}\ntruth: {caption}"]
    image = preview_image(
        np.zeros((1, 16, 16, 3), np.float32), np.zeros((1, 16, 48)), 8, 4,
        IMAGENET_MEAN, IMAGENET_STD, [None], "t", 64, captions=captions,
    )  # fmt: skip
    pixels = np.asarray(image)
    text_column = pixels[:, 8 + 4 * 72 :]
    assert (text_column != pixels[-1, -1]).any()  # the caption is drawn
    assert (pixels[:, -8:] == pixels[-1, -1]).all()  # and nothing reaches the right edge
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    wrapped = wrap_text(draw, captions[0], font, 150)
    assert wrapped.replace("\n", " ").split() == captions[0].split()
    assert all(draw.textlength(line, font=font) <= 150 for line in wrapped.splitlines())


def test_the_training_display_shows_the_last_validation_loss_with_its_step(tmp_path, capsys):
    reporter = Reporter(tmp_path, 100)
    record = {"loss": 0.5, "lr": 1e-3, "images_per_s": 0.0, "peak_memory_gb": 0.1, "eta_s": 0}
    reporter.step(10, {**record, "val_loss": None, "val_step": None})
    reporter.step(60, {**record, "val_loss": 0.25, "val_step": 50})
    lines = capsys.readouterr().err.splitlines()
    assert " val " not in lines[0]
    assert " val 0.2500 @50 " in lines[1]


def test_the_loss_curve_draws_train_and_validation():
    image = np.asarray(loss_curve_image([(1, 1.0), (2, 0.5), (3, 0.4)], [(0, 1.1), (3, 0.45)]))
    blue = ((image == (31, 119, 180)).all(-1)).sum()
    orange = ((image == (255, 127, 14)).all(-1)).sum()
    assert blue > 100 and orange > 50
    assert np.asarray(loss_curve_image([], [])).mean() > 200  # nothing to plot: a blank chart


def test_the_loss_axis_is_logarithmic_with_round_ticks():
    assert log_ticks(0.311, 1.35) == [0.2, 0.5, 1.0, 2.0]
    assert log_ticks(0.31, 0.45) == [0.3, 0.4, 0.5]  # a narrow range: every digit
    assert log_ticks(0.002, 30.0) == [0.001, 0.01, 0.1, 1.0, 10.0, 100.0]  # a wide one: decades
    assert log_ticks(0.5, 0.5) == [0.5]
    assert np.asarray(loss_curve_image([(1, 0.5)], [(1, 0.5)])).std() > 0  # one point: drawn


def test_the_loss_curve_leaves_out_losses_a_log_axis_cannot_show():
    """Zero, negative and NaN losses are not drawn (and do not stretch the axis)."""
    curve = [(1, 1.0), (2, 0.5), (3, 0.4)]
    clean = np.asarray(loss_curve_image(curve, []))
    dirty = np.asarray(loss_curve_image([*curve, (4, 0.0), (5, -0.03), (6, float("nan"))], []))
    blue = lambda image: (image == (31, 119, 180)).all(-1).any(0).nonzero()[0].max()  # noqa: E731
    assert blue(dirty) == blue(clean)  # the line still ends at step 3's x


def test_metrics_keep_the_records_up_to_a_resumed_step(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (2, 4, 6):
        log.append({"split": "train", "step": step, "loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"split": "train", "st')  # a line cut by a crash
    assert [r["step"] for r in log.read()] == [2, 4, 6]
    log.truncate_after(4)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [2, 4]
