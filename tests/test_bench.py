"""The benchmark: its FLOP count, and one tiny end-to-end run across processes."""

import json
import subprocess
import sys

import pytest
import torch
from configs import TINY_V1
from torch.utils.flop_counter import FlopCounterMode

from mlx_aim.benchmark.report import to_markdown
from mlx_aim.benchmark.suite import BenchOptions, run_benchmark, worker_env
from mlx_aim.benchmark.workload import flops_per_image, growth_cells
from mlx_aim.reference import torch_aim as ref

V1 = {**TINY_V1, "image_size": 32, "patch_size": 8, "num_heads": 2}
V2 = {**V1, "model_type": "aim_v2", "mlp_hidden_dim": 48, "pos_embed_type": "sincos"}
PRETRAIN = {"model_type": "aim_pretrain", "encoder": V1, "head_blocks": 2, "head_width": 48}


def _attention_flops(enc: dict) -> int:
    """q k^T and attn v: torch's flop counter does not see its CPU SDPA kernel."""
    n = (enc["image_size"] // enc["patch_size"]) ** 2
    return enc["num_blocks"] * 4 * n * n * enc["embed_dim"]


def _torch_flops(module, *inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("enc", [V1, V2], ids=["aim_v1", "aim_v2"])
def test_embed_flops_match_torchs_flop_counter(enc):
    kwargs = {k: v for k, v in enc.items() if k != "model_type"}
    kwargs["model_type"] = "aimv1" if enc["model_type"] == "aim_v1" else "aimv2"
    model = ref.build_reference(kwargs)
    counted = _torch_flops(model, torch.randn(1, 3, 32, 32)) + _attention_flops(enc)
    assert flops_per_image(enc) == {"embed": counted, "train": None}


def test_train_flops_are_three_forwards_of_trunk_and_head_where_the_loss_reads():
    model = ref.AIMForPretrainingTorch(ref.build_reference({**V1, "model_type": "aimv1"}), 2, 48)
    images, pair = torch.randn(2, 3, 32, 32), torch.tensor([3, 13])  # K = 16: one paired row
    forward = _torch_flops(model, images, pair, True) / 2
    assert flops_per_image(PRETRAIN, batch=2)["train"] == 3 * (forward + _attention_flops(V1))
    odd = _torch_flops(model, images[:1], pair[:1], True)  # an unpaired image fills a row alone
    padding = _torch_flops(model.head, torch.randn(3, 32))  # the row's 3 unread slots
    assert flops_per_image(PRETRAIN, batch=1)["train"] == 3 * (odd + padding + _attention_flops(V1))


def test_growth_cells_span_widths_and_patches():
    cells = growth_cells(depth=2, batch=1)
    assert sorted({c["width"] for c in cells}) == [192, 384, 768]
    assert sorted({c["patches"] for c in cells}) == [64, 196, 256, 576]
    for c in cells:
        enc = c["config"]["encoder"]
        assert (enc["image_size"] // enc["patch_size"]) ** 2 == c["patches"]
        assert enc["num_blocks"] == 2 and c["config"]["head_blocks"] == 1


@pytest.mark.slow
def test_end_to_end_run_compares_implementations_on_shared_weights(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(PRETRAIN))
    options = BenchOptions(
        config=str(path),
        batch_size=2,
        impls=("mlx-aim", "torch-eager"),
        steps=1,
        warmup=0,
        gemm_seconds=0.1,
        verbose=False,
        command="pytest",
    )
    result = run_benchmark(options)
    assert result["errors"] == []
    assert set(result["gemm_peak_gflops"]) == {"mlx (auto BLAS)", "torch"}
    for task in ("train", "embed"):
        per_impl = result["results"][task]
        assert set(per_impl) == {"mlx-aim", "torch-eager"}
        for m in per_impl.values():
            assert m["images_per_s"] > 0 and 0 < m["mfu"] < 1
        ratio = per_impl["mlx-aim"]["ratios"]["torch-eager"]
        assert ratio == pytest.approx(1 / per_impl["torch-eager"]["ratios"]["mlx-aim"])
        # Same weights and inputs in both processes: the losses and the embeddings agree.
        assert list(result["agreement"][task]) == ["torch-eager"]
        assert result["agreement"][task]["torch-eager"] < 1e-4
    assert per_impl["mlx-aim"]["mlx_peak_bytes"] > per_impl["mlx-aim"]["mlx_resident_bytes"]
    table = to_markdown(result)
    assert "| train | torch-eager |" in table and "| embed | mlx-aim |" in table
    json.dumps(result)  # JSON-able


def test_unknown_names_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown implementation"):
        run_benchmark(BenchOptions(config="aim-nano", impls=("jax",), verbose=False))
    with pytest.raises(KeyError, match="unknown model"):
        run_benchmark(BenchOptions(config="aim-huge", verbose=False))


def test_a_torch_worker_never_loads_mlx():
    """libtorch_cpu exports sgemm_: with MLX in the same process one BLAS would serve both."""
    code = (
        "import sys, mlx_aim.benchmark.worker, mlx_aim.reference.torch_aim\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlx'))"
    )
    env = worker_env("torch", None, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
