"""The LiT contrastive loss: parity with open_clip's ClipLoss (written here in PyTorch) and the
data-parallel gather (two processes under ``mlx.launch`` against one)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_aim.objectives.contrastive import INIT_LOG_SCALE, MAX_SCALE, contrastive_loss

torch = pytest.importorskip("torch")
F = torch.nn.functional

ROOT = Path(__file__).parents[1]
LAUNCH = shutil.which("mlx.launch")


def torch_clip_loss(image, text, log_scale):
    """open_clip's ClipLoss on a single process: features normalised by the model, the scale
    exp(log_scale) clamped at max as the released AIMv2 LiT forward does."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    scale = torch.exp(torch.clamp(log_scale, 0, math.log(MAX_SCALE)))
    logits_per_image = scale * image @ text.T
    logits_per_text = scale * text @ image.T
    labels = torch.arange(image.shape[0])
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


def grads_both(image, text, log_scale):
    """(loss, d/d image, d/d text, d/d log_scale) from MLX and from the torch reference."""

    def mlx_loss(i, t, s):
        return contrastive_loss(i, t, s)[0]

    loss, (gi, gt, gs) = mx.value_and_grad(mlx_loss, argnums=(0, 1, 2))(
        mx.array(image), mx.array(text), mx.array(log_scale, mx.float32)
    )
    ti, tt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (image, text))
    ts = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    ref = torch_clip_loss(ti, tt, ts)
    ref.backward()
    ours = [np.array(a) for a in (loss, gi, gt, gs)]
    theirs = [x.detach().numpy() for x in (ref, ti.grad, tt.grad, ts.grad)]
    return ours, theirs


def assert_close_to_scale(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        scale = max(float(np.abs(b).max()), 1e-3)
        assert np.abs(a - b).max() <= 1e-5 * scale, (a, b)


@pytest.mark.parametrize("log_scale", [INIT_LOG_SCALE, 0.5, math.log(MAX_SCALE) - 0.2])
def test_loss_and_gradients_match_open_clip(log_scale):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 16)).astype(np.float32)
    text = (image @ rng.normal(size=(16, 16)) * 0.3 + rng.normal(size=(12, 16))).astype(np.float32)
    ours, theirs = grads_both(image, text, log_scale)
    assert_close_to_scale(ours, theirs)
    assert abs(float(ours[3])) > 1e-4  # the scale is learning


def test_scale_is_clamped_at_100_with_no_gradient_past_it():
    rng = np.random.default_rng(1)
    image, text = (rng.normal(size=(6, 8)).astype(np.float32) for _ in range(2))
    ours, theirs = grads_both(image, text, math.log(MAX_SCALE) + 1.0)
    assert_close_to_scale(ours, theirs)
    assert float(ours[3]) == 0.0
    at_max = contrastive_loss(mx.array(image), mx.array(text), mx.array(math.log(MAX_SCALE)))[0]
    assert float(ours[0]) == pytest.approx(at_max.item(), rel=1e-6)


def test_accuracy_counts_pairs_that_win_in_both_directions():
    image = mx.eye(4)
    text = mx.array(np.eye(4)[[0, 1, 3, 2]], mx.float32)  # pairs 2 and 3 swapped
    _, accuracy = contrastive_loss(image, text, mx.array(INIT_LOG_SCALE))
    assert accuracy.item() == pytest.approx(0.5)


GATHER_SCRIPT = """
import sys
import mlx_aim
import mlx.core as mx
import numpy as np
from mlx_aim.objectives.contrastive import contrastive_loss

group = mx.distributed.init()
rank, size = group.rank(), group.size()
data = np.load(sys.argv[1])
rows = data["image"].shape[0] // size
mine = slice(rank * rows, (rank + 1) * rows)
weight = mx.array(data["weight"])

def loss_fn(w, s, image, text):
    loss, accuracy = contrastive_loss(image @ w, text @ w, s, world_size=size)
    return loss, accuracy

(loss, accuracy), (gw, gs) = mx.value_and_grad(loss_fn, argnums=(0, 1))(
    weight, mx.array(data["log_scale"]), mx.array(data["image"][mine]), mx.array(data["text"][mine])
)
if size > 1:  # data parallel: average the parameter gradients over the processes
    gw, gs = (mx.distributed.all_sum(g) / size for g in (gw, gs))
np.savez(f"{sys.argv[2]}-rank{rank}.npz", loss=np.array(loss), accuracy=np.array(accuracy),
         gw=np.array(gw), gs=np.array(gs))
"""


@pytest.mark.skipif(LAUNCH is None, reason="needs mlx.launch")
def test_two_processes_give_the_loss_and_gradients_of_one(tmp_path):
    from test_train_distributed import free_port

    rng = np.random.default_rng(2)
    data = tmp_path / "data.npz"
    np.savez(
        data,
        image=rng.normal(size=(8, 6)).astype(np.float32),
        text=rng.normal(size=(8, 6)).astype(np.float32),
        weight=rng.normal(size=(6, 5)).astype(np.float32),
        log_scale=np.float32(INIT_LOG_SCALE),
    )
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    single = subprocess.run(
        [sys.executable, script, data, tmp_path / "one"], capture_output=True, text=True, cwd=ROOT
    )
    assert single.returncode == 0, single.stderr
    launch = [LAUNCH, "-n", "2", "--starting-port", str(free_port()), "--", sys.executable]
    double = subprocess.run(
        [*launch, str(script), str(data), str(tmp_path / "two")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert double.returncode == 0, double.stdout + double.stderr
    one = np.load(tmp_path / "one-rank0.npz")
    for rank in (0, 1):
        two = np.load(tmp_path / f"two-rank{rank}.npz")
        for key in ("loss", "accuracy", "gw", "gs"):
            scale = max(float(np.abs(one[key]).max()), 1e-3)
            assert np.abs(two[key] - one[key]).max() <= 1e-5 * scale, (key, json.dumps(rank))
