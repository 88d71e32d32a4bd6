"""Downstream tracking during training (``--probe-data``) and the ablation study (``mlx_aim.experiments.study``)."""

import json
import math

import numpy as np
import pytest
from configs import TINY_PRETRAIN
from PIL import Image

from mlx_aim.errors import InputError
from mlx_aim.experiments import study
from mlx_aim.experiments.study import Checkpoint, StudyConfig, spearman
from mlx_aim.train import TrainConfig, train
from mlx_aim.train.checkpoint import CheckpointStore
from mlx_aim.train.report import loss_curve_image
from mlx_aim.train.resume import DATA_FILE, check_resumable


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    path.write_text(json.dumps(TINY_PRETRAIN))
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """Two classes of 12 small images: dark and bright blobs (a probe can tell them apart)."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for label, level in (("dark", 40), ("bright", 210)):
        (root / label).mkdir()
        for i in range(12):
            small = np.clip(rng.normal(level, 30, (4, 4, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(small).resize((20, 20), Image.Resampling.BICUBIC).save(
                root / label / f"{i:02d}.png"
            )
    return str(root)


def run_config(output, model, data, **overrides) -> TrainConfig:
    settings = dict(
        model=model, data=data, output=str(output), steps=4, batch_size=4, checkpoint_every=2,
        val_every=2, preview_every=0, log_every=2, val_images=8, workers=1, quiet=True,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def metrics(folder, split: str) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


# ---- downstream tracking ----------------------------------------------------------------------


def test_a_run_probes_its_trunk_at_the_start_every_n_steps_and_at_the_end(
    tmp_path, tiny_model, images
):
    train(run_config(tmp_path, tiny_model, images, steps=5, probe_data=images, probe_every=2))
    probes = metrics(tmp_path, "probe")
    assert [r["step"] for r in probes] == [0, 2, 4, 5]
    assert all(0 <= r["top1"] <= 1 and math.isfinite(r["loss"]) for r in probes)
    assert (tmp_path / "loss.png").is_file()


def test_the_loss_curve_draws_the_probe_top1_in_green_on_a_second_axis():
    green = np.array([44, 160, 44])
    loss = [(0, 1.0), (10, 0.5)]

    def green_pixels(**probe) -> int:
        image = np.asarray(loss_curve_image(loss, loss, **probe)).astype(int)
        return int((np.abs(image - green).sum(-1) == 0).sum())

    assert green_pixels() == 0
    assert green_pixels(probe=[(0, 0.5), (10, 0.9)]) > 100


def test_unusable_probe_data_is_refused_before_the_output_is_created(tmp_path, tiny_model, images):
    with pytest.raises(InputError, match="--probe-data .*missing: not a folder"):
        train(
            run_config(tmp_path / "run", tiny_model, images, probe_data=str(tmp_path / "missing"))
        )
    assert not (tmp_path / "run").exists()


def test_probing_changes_neither_the_training_nor_the_model(tmp_path, tiny_model, images):
    plain = train(run_config(tmp_path / "plain", tiny_model, images))
    probed = train(run_config(tmp_path / "probed", tiny_model, images, probe_data=images))
    assert metrics(tmp_path / "probed", "train") and metrics(tmp_path / "probed", "probe")
    plain_losses = [r["loss"] for r in metrics(tmp_path / "plain", "train")]
    # the same random state: the same prefixes, the same updates
    assert [r["loss"] for r in metrics(tmp_path / "probed", "train")] == plain_losses
    assert plain.val_loss == probed.val_loss


# ---- resuming with the switches ----------------------------------------------------------------


def test_resuming_refuses_a_changed_switch(tmp_path, tiny_model, images):
    train(run_config(tmp_path, tiny_model, images, steps=2, patch_order="spiral"))
    with pytest.raises(InputError, match="--patch-order 'spiral', this command has 'raster'"):
        train(run_config(tmp_path, tiny_model, images, steps=4))
    with pytest.raises(InputError, match="--min-crop-scale 0.4, this command has 0.2"):
        train(
            run_config(
                tmp_path, tiny_model, images, steps=4, patch_order="spiral", min_crop_scale=0.2
            )
        )


def test_a_checkpoint_from_before_the_switches_resumes_with_the_defaults(
    tmp_path, tiny_model, images
):
    train(run_config(tmp_path, tiny_model, images, steps=2))
    checkpoint = CheckpointStore(tmp_path, 1, log=print).load_latest()
    for name in ("target", "attention", "patch_order", "min_crop_scale"):
        del checkpoint.state["config"][name]  # as an older version wrote it
    same = (checkpoint.state["model_config"], 1, checkpoint.documents[DATA_FILE])
    resumed = run_config(tmp_path, tiny_model, images, steps=2)
    assert check_resumable(checkpoint, resumed, *same) == []
    with pytest.raises(InputError, match="--target 'norm-pixels', this command has 'pixels'"):
        changed = run_config(tmp_path, tiny_model, images, steps=2, target="pixels")
        check_resumable(checkpoint, changed, *same)


# ---- the study ---------------------------------------------------------------------------------


def test_spearman_is_the_correlation_of_ranks_with_ties_averaged():
    assert spearman([1, 2, 3, 4], [10, 20, 25, 90]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 8, 7, -1]) == pytest.approx(-1.0)
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 3, 2, 4 -> Pearson of the ranks, by hand
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4])
    expected = np.corrcoef(rx, ry)[0, 1]
    assert spearman([0.1, 0.5, 0.5, 0.9], [3, 7, 5, 8]) == pytest.approx(expected)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant has no ranking
    with pytest.raises(ValueError, match="one length"):
        spearman([1, 2], [1])


def test_each_cell_changes_one_setting_of_the_default_recipe(tmp_path):
    config = StudyConfig(output=str(tmp_path), steps=20, eval_every=5)
    default = study.train_config(config, "default", 0).to_dict()
    assert default["probe_every"] == default["checkpoint_every"] == default["val_every"] == 5
    expected = {
        "pixels": {"target": "pixels"},
        "causal": {"attention": "causal"},
        "spiral": {"patch_order": "spiral"},
        "checkerboard": {"patch_order": "checkerboard"},
        "random-order": {"patch_order": "random"},
        "shallow-head": {"head_blocks": 1},
    }
    for cell, change in expected.items():
        settings = study.train_config(config, cell, 0).to_dict()
        differences = {k: v for k, v in settings.items() if v != default[k] and k != "output"}
        assert differences == change
    assert study.train_config(config, "default", 1).seed == 1


def test_the_table_gives_mean_and_half_range_over_seeds(tmp_path):
    config = StudyConfig(output=str(tmp_path), steps=10, seeds=2, cells=["default", "pixels"])
    points = [
        Checkpoint("default", 0, 10, 0.30, 0.80), Checkpoint("default", 1, 10, 0.20, 0.90),
        Checkpoint("pixels", 0, 10, 0.50, 0.70), Checkpoint("pixels", 1, 10, 0.50, 0.72),
        Checkpoint("default", 0, 5, 0.60, 0.60),
    ]  # fmt: skip
    table = study.markdown(config, points)
    assert "| default | the paper's recipe | 85.0 ± 5.0 | 0.2500 ± 0.0500 | 70.0 / 78.2 |" in table
    assert "| pixels | raw-pixel targets | 71.0 ± 1.0 | 0.5000 ± 0.0000 |" in table
    # ranks of the losses 2, 1, 3.5, 3.5, 5 against those of the top-1s 4, 5, 2, 3, 1: -0.97
    assert "- all trained checkpoints: -0.97 (5 checkpoints)" in table
    # only default seed 0 has two checkpoints: its loss fell and its top-1 rose
    assert "- within each run, mean over 1 runs: -1.00 (5 checkpoints)" in table


def test_unknown_cells_are_refused():
    with pytest.raises(InputError, match="unknown cell 'deeper'"):
        StudyConfig(cells=["default", "deeper"]).validate()


def test_the_study_runs_end_to_end_and_keeps_finished_runs(
    tmp_path, tiny_model, images, monkeypatch
):
    config = StudyConfig(
        data=images, probe_data=images, model=tiny_model, steps=2, eval_every=2, seeds=1,
        cells=["default", "causal"], batch_size=4, output=str(tmp_path), workers=1,
    )  # fmt: skip
    points = study.run_study(config, log=lambda message: None)
    assert [(p.cell, p.step) for p in points] == [
        ("default", 0),
        ("default", 2),
        ("causal", 0),
        ("causal", 2),
    ]
    for name in study.STUDY_FILES:
        assert (tmp_path / name).is_file()
    assert "| causal | causal attention, no prefix |" in (tmp_path / "study.md").read_text()

    def no_training(config):
        raise AssertionError(f"{config.output} was trained again")

    monkeypatch.setattr("mlx_aim.train.train", no_training)
    logged = []
    assert study.run_study(config, log=logged.append) == points
    assert all("finished before" in line for line in logged)
