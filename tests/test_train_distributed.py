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
from PIL import Image
from train_helpers import TINY_PRETRAIN

ROOT = Path(__file__).parents[1]
LAUNCH = shutil.which("mlx.launch")

SCRIPT = """
import sys
import mlx_aim
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_aim.train import TrainConfig, train

model, data, output = sys.argv[1:4]
result = train(TrainConfig(
    model=model, data=data, output=output, steps=4, batch_size=8, lr=1e-3, checkpoint_every=2,
    val_every=2, val_images=6, preview_every=2, log_every=1, quiet=True,
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


@pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")
def test_two_processes_keep_identical_weights_equal_to_one_process(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    (tmp_path / "run.py").write_text(SCRIPT)
    rng = np.random.default_rng(2)
    (tmp_path / "images").mkdir()
    for i in range(30):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((20, 20), Image.Resampling.BICUBIC).save(
            tmp_path / "images" / f"{i:02d}.png"
        )
    args = [str(tmp_path / "run.py"), str(tmp_path / "tiny.json"), str(tmp_path / "images")]

    single = subprocess.run(
        [sys.executable, *args, str(tmp_path / "one")], cwd=ROOT, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr
    port = str(free_port())
    launch = [LAUNCH, "-n", "2", "--starting-port", port, "--", sys.executable]
    double = subprocess.run(
        [*launch, *args, str(tmp_path / "two")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert double.returncode == 0, double.stdout + double.stderr

    one = mx.load(str(tmp_path / "one-rank0.safetensors"))
    rank0 = mx.load(str(tmp_path / "two-rank0.safetensors"))
    rank1 = mx.load(str(tmp_path / "two-rank1.safetensors"))
    assert all(mx.array_equal(rank0[k], rank1[k]).item() for k in one)  # ranks never drift
    worst = max(mx.abs(one[k] - rank0[k]).max().item() for k in one)
    assert worst <= 1e-5, worst

    # only rank 0 wrote: one record per step, one checkpoint set, the exported trunk
    records = [
        json.loads(r) for r in (tmp_path / "two" / "metrics.jsonl").read_text().split("\n")[:-1]
    ]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    losses = [
        [r["loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").open())]
        for name in ("one", "two")
    ]
    assert np.allclose(losses[0], losses[1], rtol=1e-5)
    assert (tmp_path / "two" / "model.safetensors").exists()
    state = json.loads(
        (tmp_path / "two" / "checkpoints" / "step-00000004" / "state.json").read_text()
    )
    assert state["world_size"] == 2 and len(state["loaders"]) == 2
