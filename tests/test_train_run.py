"""End-to-end runs of ``mlx_aim.train.train`` and ``mlx-aim train`` with a tiny model."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_PRETRAIN
from image_corpus import make_corpus
from PIL import Image

import mlx_aim
from mlx_aim.errors import ExitCode, InputError, NonFiniteError, OutputError
from mlx_aim.train import TrainConfig, train
from mlx_aim.train.output import OutputLock
from mlx_aim.train.run import summary

TINY = TINY_PRETRAIN


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """40 small smooth RGB images in nested folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(40):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((24, 20), Image.Resampling.BICUBIC)
        folder = root / f"group{i % 3}"
        folder.mkdir(exist_ok=True)
        img.save(folder / f"{i:03d}.png")
    return str(root)


def config(output, model, data, **overrides) -> TrainConfig:
    settings = dict(
        model=model,
        data=data,
        output=str(output),
        steps=6,
        batch_size=4,
        checkpoint_every=3,
        val_every=3,
        preview_every=3,
        log_every=2,
        val_images=8,
        val_fraction=0.2,
        workers=1,
        quiet=True,
    )
    return TrainConfig(**{**settings, **overrides})


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from mlx_aim_cli.main import app; app()", "train", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parents[1]
    )


def test_a_run_leaves_checkpoints_metrics_previews_and_a_loadable_trunk(
    tmp_path, tiny_model, images
):
    result = train(config(tmp_path, tiny_model, images, keep_checkpoints=1))
    assert result.step == 6 and result.resumed_from is None
    assert math.isfinite(result.final_loss) and math.isfinite(result.val_loss)
    assert result.images_per_second > 0 and result.peak_memory_gb > 0

    names = {p.name for p in tmp_path.iterdir()}
    expected = {"config.json", "model.safetensors", "preprocess.json", "run.json"}
    assert expected | {"metrics.jsonl", "loss.png", "previews", "checkpoints"} <= names
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000006"]
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == [
        "step-00000003.png",
        "step-00000006.png",
    ]
    assert Image.open(tmp_path / "loss.png").size == (720, 420)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in records] == [
        ("val", 0), ("train", 2), ("val", 3), ("train", 4), ("train", 6), ("val", 6),
    ]  # fmt: skip
    train_keys = {"loss", "lr", "grad_norm", "images_per_s", "eta_s", "peak_memory_gb"}
    assert train_keys <= set(records[1])
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["steps"] == 6 and run["model_config"] == TINY
    assert run["train_images"] == 32 and run["val_images"] == 8

    model = mlx_aim.load(tmp_path)
    assert model.args.model_type == "aim_v1" and model.preprocessing.crop == 16
    tokens = model(mx.zeros((1, 16, 16, 3)))
    assert tokens.shape == (1, 16, 32)
    trained = result.model.encoder.trunk.blocks[0].attn.qkv.weight
    assert mx.array_equal(model.trunk.blocks[0].attn.qkv.weight, trained).item()


@pytest.mark.parametrize("data", [None, "digits"])
def test_no_data_argument_or_the_name_digits_trains_on_the_builtin_digits_from_any_folder(
    tmp_path, tiny_model, monkeypatch, data
):
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    result = train(config(tmp_path / "out", tiny_model, data, steps=2, preview_every=0))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert "digits" in run["data"] and run["train_images"] == 1500 and run["val_images"] == 297
    assert result.step == 2
    header = (tmp_path / "out" / "train.log").read_text().splitlines()[0]
    assert "8 of 297 validation images (--val-images)" in header


def test_unreadable_files_are_skipped_counted_and_named_once_even_across_resumes(
    tmp_path, tiny_model
):
    corpus = make_corpus(tmp_path / "corpus")
    data = str(tmp_path / "corpus")
    result = train(config(tmp_path / "out", tiny_model, data, val_fraction=0.0, steps=15))
    assert result.step == 15
    assert sorted(result.skipped_files) == sorted(str(p) for p in corpus["bad"])
    resumed = train(config(tmp_path / "out", tiny_model, data, val_fraction=0.0, steps=30))
    assert resumed.resumed_from == 15 and sorted(resumed.skipped_files) == result.skipped_files
    log = (tmp_path / "out" / "train.log").read_text()
    assert log.count("resuming from") == 1
    for path in corpus["bad"]:
        assert log.count(f"skipping {path}:") == 1, path


def test_a_learning_rate_far_too_high_stops_with_the_step_and_keeps_the_checkpoint(
    tmp_path, tiny_model, images
):
    cfg = config(tmp_path, tiny_model, images, lr=1e6, warmup_steps=0, steps=20)
    cfg.checkpoint_every = 1
    with pytest.raises(NonFiniteError) as e:
        train(cfg)
    assert e.value.exit_code == ExitCode.NON_FINITE and e.value.step >= 2
    message = str(e.value)
    assert f"at step {e.value.step}" in message and "--lr" in message
    last = tmp_path / "checkpoints" / f"step-{e.value.step - 1:08d}"
    assert f"last good checkpoint: {last}" in message and last.is_dir()
    assert not (tmp_path / "model.safetensors").exists()  # nothing exported from a broken run


def test_a_damaged_latest_checkpoint_is_skipped_removed_and_never_outlives_an_intact_one(
    tmp_path, tiny_model, images
):
    cfg = config(tmp_path, tiny_model, images, checkpoint_every=2, steps=6, preview_every=0)
    train(cfg)
    model_file = tmp_path / "checkpoints" / "step-00000006" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    cfg.steps, cfg.keep_checkpoints = 8, 1
    result = train(cfg)
    assert result.resumed_from == 4 and result.step == 8
    log = (tmp_path / "train.log").read_text()
    assert f"checkpoint {model_file.parent} is damaged" in log
    assert "resuming from" in log and "step-00000004 (step 4)" in log
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000008"]
    cfg.steps = 10
    assert train(cfg).resumed_from == 8  # the next run finds an intact checkpoint


def test_leftovers_of_interrupted_writes_are_cleaned_when_a_run_starts(
    tmp_path, tiny_model, images
):
    cfg = config(tmp_path, tiny_model, images, steps=2, preview_every=0)
    train(cfg)
    leftovers = [
        tmp_path / "checkpoints" / ".step-00000002.old",
        tmp_path / "checkpoints" / ".step-00000004.k2j3.tmp",
        tmp_path / ".model.safetensors.export.tmp",
    ]
    for folder in leftovers:
        folder.mkdir()
    (tmp_path / ".metrics.jsonl.x8y.tmp").write_text("{")
    (tmp_path / ".loss.png.old").write_bytes(b"")
    cfg.steps = 4
    assert train(cfg).step == 4
    hidden = [p.name for p in [*tmp_path.iterdir(), *(tmp_path / "checkpoints").iterdir()]]
    assert [n for n in hidden if n.startswith(".")] == []


def test_changed_training_files_stop_a_resume_unless_allowed(tmp_path, tiny_model, images):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    cfg = config(tmp_path / "out", tiny_model, str(data), steps=2, preview_every=0)
    train(cfg)
    files = sorted(data.rglob("*.png"))
    shutil.copy(files[0], data / "new.png")
    files[1].unlink()
    os.utime(files[2], ns=(0, 0))
    files[3].write_bytes(files[3].read_bytes() + b"\0")
    cfg.steps = 4
    with pytest.raises(InputError) as e:
        train(cfg)
    assert "training files changed since" in str(e.value) and "--allow-data-change" in str(e.value)
    assert "(1 added, 1 removed, 2 modified)" in str(e.value)
    cfg.allow_data_change = True
    assert train(cfg).resumed_from == 2
    log = (tmp_path / "out" / "train.log").read_text()
    assert "training files (1 added, 1 removed, 2 modified)" in log.split("changed since the")[1]


def test_a_full_disk_while_checkpointing_keeps_the_earlier_checkpoints(
    tmp_path, tiny_model, images, monkeypatch
):
    save = mx.save_safetensors

    def full_at_step_6(path, *args, **kwargs):
        if "step-00000006" in path:
            raise RuntimeError(f"[save_safetensors] Failed to write {path}")
        save(path, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", full_at_step_6)
    with pytest.raises(OutputError) as e:
        train(config(tmp_path, tiny_model, images, steps=6, preview_every=0))
    assert e.value.exit_code == ExitCode.OUTPUT and "\n" not in str(e.value)
    assert "step-00000006" in str(e.value) and "the earlier checkpoints are intact" in str(e.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000003"]


def test_a_refused_preflight_leaves_no_output_folder(tmp_path, tiny_model, images, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    with pytest.raises(OutputError, match="has 1.0 MiB free; this run needs about"):
        train(config(tmp_path / "run", tiny_model, images))
    assert list(tmp_path.iterdir()) == []


def test_a_finished_run_run_again_reports_its_last_losses_and_no_speed(
    tmp_path, tiny_model, images
):
    first = train(config(tmp_path, tiny_model, images, preview_every=0))
    again = train(config(tmp_path, tiny_model, images, preview_every=0))
    assert again.step == again.resumed_from == 6 and again.images_per_second is None
    assert (again.final_loss, again.val_loss) == (first.final_loss, first.val_loss)
    line = summary(again)
    assert line.startswith("done: step 6, train loss") and "images/s" not in line
    assert f"validation loss {first.initial_val_loss:.4f} -> {first.val_loss:.4f}" in line
    assert "(6 steps in" in summary(first)
    one_step = summary(dataclasses.replace(first, step=1, skipped_files=["a.png"]))
    assert "(1 step in" in one_step and "1 unreadable file skipped" in one_step


def test_resuming_refuses_settings_that_change_the_data_order(tmp_path, tiny_model, images):
    train(config(tmp_path, tiny_model, images, steps=2, preview_every=0))
    with pytest.raises(InputError, match="--batch-size 4, this command has 8"):
        train(config(tmp_path, tiny_model, images, steps=4, batch_size=8))


def test_a_second_run_on_a_locked_output_exits_3_and_a_stale_lock_is_recovered(
    tmp_path, tiny_model, images
):
    args = ["-m", tiny_model, "-d", images, "-o", str(tmp_path), "-n", "1", "-b", "4", "--quiet"]
    with OutputLock(tmp_path):
        refused = run_cli(*args)
        (tmp_path / "train.lock").unlink()  # the lock is held on the folder, not on this file
        refused_again = run_cli(*args)
    for result in (refused, refused_again):
        assert result.returncode == ExitCode.OUTPUT
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: ") and "in use by another training run (" in line
    assert f"(pid {os.getpid()} on " in refused.stderr
    assert not (tmp_path / "checkpoints").exists()

    (tmp_path / "train.lock").write_text('{"pid": 999999999, "host": "crashed-host"}')
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "train.log").read_text()
    assert (
        "recovered a stale lock left by a run that is gone (pid 999999999 on crashed-host)" in log
    )


def test_an_unwritable_output_exits_3_before_training(tmp_path, tiny_model, images):
    (tmp_path / "file").write_text("x")
    result = run_cli("-m", tiny_model, "-d", images, "-o", str(tmp_path / "file" / "run"))
    assert result.returncode == ExitCode.OUTPUT
    assert result.stderr.strip().startswith("error: cannot create the output directory")
    assert len(result.stderr.strip().splitlines()) == 1


def test_bfloat16_on_the_cpu_runs_and_says_how_slow_it_is(tmp_path, tiny_model, images):
    result = train(config(tmp_path, tiny_model, images, steps=1, dtype="bfloat16"))
    assert math.isfinite(result.final_loss)
    log = (tmp_path / "train.log").read_text()
    on_cpu = mx.default_device() == mx.cpu
    assert ("bfloat16 on MLX's CPU backend" in log) == on_cpu
