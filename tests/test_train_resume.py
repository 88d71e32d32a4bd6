"""Interrupted runs resume to the same weights as an uninterrupted run (subprocesses, SIGKILL)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_PRETRAIN
from PIL import Image

from mlx_aim.train.checkpoint import FAULT_ENV
from mlx_aim.train.resume import data_changes, data_listing

ROOT = Path(__file__).parents[1]
STEPS = 12
TINY = TINY_PRETRAIN


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The command line of a 12-step run (accumulating 2 micro-batches), and its outcome."""
    root = tmp_path_factory.mktemp("resume")
    (root / "tiny.json").write_text(json.dumps(TINY))
    rng = np.random.default_rng(1)
    (root / "images").mkdir()
    for i in range(24):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((20, 20), Image.Resampling.BICUBIC).save(
            root / "images" / f"{i:02d}.png"
        )
    args = ["-m", str(root / "tiny.json"), "-d", str(root / "images"), "-n", str(STEPS)]
    args += ["-b", "4", "--grad-accum", "2", "--checkpoint-every", "2", "--keep-checkpoints", "2"]
    args += ["--val-every", "4", "--val-images", "4", "--preview-every", "0", "--quiet"]
    reference = root / "reference"
    assert command(args, reference).wait(timeout=120) == 0
    return args, reference


def command(args, output, fault=None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    argv = [sys.executable, "-c", "from mlx_aim_cli.main import app; app()", "train", *args]
    return subprocess.Popen(
        [*argv, "-o", str(output)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def latest_checkpoint_step(output: Path) -> int:
    names = [p.name for p in (output / "checkpoints").glob("step-*")]
    return max(int(name.removeprefix("step-")) for name in names)


def final_state(output: Path) -> dict[str, mx.array]:
    folder = output / "checkpoints" / f"step-{STEPS:08d}"
    state = mx.load(str(folder / "model.safetensors"))
    optimizer = mx.load(str(folder / "optimizer.safetensors"))
    state.update({f"optimizer.{k}": v.astype(mx.float32) for k, v in optimizer.items()})
    state.update({f"export.{k}": v for k, v in mx.load(str(output / "model.safetensors")).items()})
    return state


def assert_same_weights(output: Path, reference: Path) -> None:
    a, b = final_state(output), final_state(reference)
    assert a.keys() == b.keys()
    worst = max(mx.abs(a[k] - b[k]).max().item() for k in a)
    assert worst <= 1e-6, worst
    losses = [
        [(r["step"], r["loss"]) for r in map(json.loads, (o / "metrics.jsonl").open())]
        for o in (output, reference)
    ]
    assert losses[0] == losses[1]


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, setup):
    args, reference = setup
    killed = command(args, tmp_path, fault="kill-after-checkpoint:6")
    assert killed.wait(timeout=120) == -signal.SIGKILL
    resumed = command(args, tmp_path)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    assert "resuming from" in (tmp_path / "train.log").read_text()
    assert_same_weights(tmp_path, reference)


def test_kill_9_inside_a_checkpoint_write_and_at_random_moments(tmp_path, setup):
    args, reference = setup
    inside = command(args, tmp_path, fault="kill-in-checkpoint:4")
    assert inside.wait(timeout=120) == -signal.SIGKILL
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert "step-00000002" in leftovers and "step-00000004" not in leftovers
    assert any(name.startswith(".step-00000004.") for name in leftovers)  # the cut-off write

    # then: once at a random moment of start-up, and twice just after a new checkpoint
    process = command(args, tmp_path)
    time.sleep(random.Random(0).uniform(0.05, 0.4))  # Python and MLX are still importing
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=120) == -signal.SIGKILL
    for _ in range(2):
        step = latest_checkpoint_step(tmp_path) + 2
        process = command(args, tmp_path, fault=f"kill-after-checkpoint:{step}")
        assert process.wait(timeout=120) == -signal.SIGKILL

    final = command([*args, "--resume"], tmp_path)
    assert final.wait(timeout=120) == 0, final.stderr.read()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_same_weights(tmp_path, reference)


@pytest.mark.parametrize("name, code", [("sigint", 130), ("sigterm", 143), ("sighup", 129)])
def test_a_stop_signal_writes_a_checkpoint_exits_128_plus_it_and_the_run_continues(
    tmp_path, setup, name, code
):
    args, reference = setup
    stopped = command(args, tmp_path, fault=f"{name}-after-checkpoint:4")
    assert stopped.wait(timeout=120) == code
    (line,) = stopped.stderr.read().strip().splitlines()
    assert f"interrupted by {name.upper()} at step" in line and "Traceback" not in line
    step = latest_checkpoint_step(tmp_path)
    assert 4 <= step < STEPS and (tmp_path / "model.safetensors").exists()
    resumed = command(args, tmp_path)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    assert_same_weights(tmp_path, reference)


def test_the_training_file_fingerprint_counts_what_changed(tmp_path):
    names = ["a.png", "b c.png", "d.png"]  # a space in a name is part of the path
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    before = data_listing([tmp_path / n for n in names])
    (tmp_path / "b c.png").write_bytes(b"xy")
    (tmp_path / "d.png").unlink()
    (tmp_path / "e.png").write_bytes(b"x")
    after = data_listing([tmp_path / n for n in ("a.png", "b c.png", "e.png")])
    assert data_changes(before, after) == "1 added, 1 removed, 1 modified"
    assert data_changes(after, after) == ""
    assert data_changes({"files": 7}, after) == "3 added"  # a listing of another shape
