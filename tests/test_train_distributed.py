"""Data parallelism: ``mlx.launch -n 2`` (ring backend on localhost) against one process."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_AIMV2_TRUNK, TINY_PRETRAIN
from PIL import Image

ROOT = Path(__file__).parents[1]
LAUNCH = shutil.which("mlx.launch")

SCRIPT = """
import json
import sys
import mlx_aim
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_aim.train import TrainConfig, train

model, data, output, extra = sys.argv[1:5]
result = train(TrainConfig(
    model=model, data=data, output=output, steps=4, batch_size=8, lr=1e-3, checkpoint_every=2,
    val_every=2, val_images=6, preview_every=2, log_every=1, quiet=True, **json.loads(extra),
))
rank = mx.distributed.init().rank() if mx.distributed.is_available() else 0
weights = dict(tree_flatten(result.model.parameters()))
mx.save_safetensors(f"{output}-rank{rank}.safetensors", weights)
"""

TINY = TINY_PRETRAIN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one_and_two_processes(tmp_path: Path, model: dict, data: Path, **extra) -> None:
    """Train the same run in one process and in two (``mlx.launch``), into tmp_path/one and /two;
    each rank saves its final weights next to them."""
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "run.py").write_text(SCRIPT)
    args = [str(tmp_path / "run.py"), str(tmp_path / "model.json"), str(data)]
    single = subprocess.run(
        [sys.executable, *args, str(tmp_path / "one"), json.dumps(extra)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr
    port = str(free_port())
    launch = [LAUNCH, "-n", "2", "--starting-port", port, "--", sys.executable]
    double = subprocess.run(
        [*launch, *args, str(tmp_path / "two"), json.dumps(extra)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert double.returncode == 0, double.stdout + double.stderr


def assert_same_weights(tmp_path: Path) -> None:
    """Both ranks hold identical weights, within 1e-5 of the single-process run's."""
    one = mx.load(str(tmp_path / "one-rank0.safetensors"))
    rank0 = mx.load(str(tmp_path / "two-rank0.safetensors"))
    rank1 = mx.load(str(tmp_path / "two-rank1.safetensors"))
    assert all(mx.array_equal(rank0[k], rank1[k]).item() for k in one)  # ranks never drift
    worst = max(mx.abs(one[k] - rank0[k]).max().item() for k in one)
    assert worst <= 1e-5, worst


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")
def test_two_processes_keep_identical_weights_equal_to_one_process(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "images").mkdir()
    for i in range(30):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((20, 20), Image.Resampling.BICUBIC).save(
            tmp_path / "images" / f"{i:02d}.png"
        )
    run_one_and_two_processes(tmp_path, TINY, tmp_path / "images")
    assert_same_weights(tmp_path)

    # only rank 0 wrote: one record per step, one checkpoint set, the exported trunk
    records = metrics(tmp_path / "two")
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    losses = [[r["loss"] for r in metrics(tmp_path / name)] for name in ("one", "two")]
    assert np.allclose(losses[0], losses[1], rtol=1e-5)
    assert (tmp_path / "two" / "model.safetensors").exists()
    state = json.loads(
        (tmp_path / "two" / "checkpoints" / "step-00000004" / "state.json").read_text()
    )
    assert state["world_size"] == 2 and len(state["loaders"]) == 2


@pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")
def test_two_processes_train_aimv2_like_one_process(tmp_path):
    pytest.importorskip("tokenizers")
    rng = np.random.default_rng(3)
    (tmp_path / "images").mkdir()
    for i in range(24):
        colour = ("red", "green", "blue")[i % 3]
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i:02d}.png")
        words = " and a dot" * (i % 4)  # captions of different lengths: the token counts differ
        (tmp_path / "images" / f"{i:02d}.txt").write_text(f"a {colour} square{words}")
    aimv2 = dict(
        objective="aimv2", vocab_size=300, decoder_width=32, decoder_depth=1, decoder_heads=2,
        val_fraction=0.25, workers=0, hflip=0.0,
    )  # fmt: skip
    run_one_and_two_processes(tmp_path, TINY_AIMV2_TRUNK, tmp_path / "images", **aimv2)
    assert_same_weights(tmp_path)

    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [(r["split"], r["step"]) for r in one] == [(r["split"], r["step"]) for r in two]
    assert sum(r["split"] == "val" for r in two) >= 2  # the validation ran, split over the ranks
    for key in ("loss", "image_loss", "text_loss"):
        ours, single = [r[key] for r in two], [r[key] for r in one]
        assert np.allclose(ours, single, rtol=1e-5), key
    assert (tmp_path / "two" / "tokenizer.json").read_text() == (
        tmp_path / "one" / "tokenizer.json"
    ).read_text()
