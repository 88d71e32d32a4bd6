"""Tiny stand-ins for the released AIM / AIMv2 checkpoints, written in their exact file layouts.

The weights come from the independent PyTorch reference (``mlx_aim.benchmark.torch_reference``)
with every tensor random (norm scales, biases and BatchNorm running statistics included). Tiny
architectures are registered under test names (``monkeypatch``) so that shape inference and ``--arch`` can find them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import torch
from safetensors.torch import save_file

from mlx_aim.checkpoints.registry import (
    REGISTRY,
    Checkpoint,
    Entry,
    aim_v1_preprocessing,
    aim_v2_preprocessing,
)
from mlx_aim.reference.torch_aim import (
    AIMv1Torch,
    AIMv2VisionTorch,
    init_random_,
    to_transformers_state_dict,
)

V1_NAME = "aim-test"
V1_STEM = "aim_test_2bimgs"
V1_CONFIG = {
    "model_type": "aim_v1",
    "image_size": 28,
    "patch_size": 7,
    "embed_dim": 32,
    "num_blocks": 7,
    "num_heads": 4,
}
V1_CLASSES = 10
V1_BEST_LAYERS = (2, 3, 4)
V1_CHECKPOINT = Checkpoint(
    repo="apple/AIM",
    revision=None,
    files=(f"{V1_STEM}_attnprobe_backbone.pth",),
    head_files={
        "last": f"{V1_STEM}_attnprobe_head_last_layers.pth",
        "best": f"{V1_STEM}_attnprobe_head_best_layers.pth",
    },
    best_layers=V1_BEST_LAYERS,
)

V2_NAMES = {"absolute": "aimv2-test-patch7-28", "sincos": "aimv2-test-patch7-native"}
V2_CONFIG = {
    "model_type": "aim_v2",
    "image_size": 28,
    "patch_size": 7,
    "embed_dim": 32,
    "num_blocks": 2,
    "num_heads": 4,
    "mlp_hidden_dim": 64,
}
V2_REVISION = "0123456789abcdef0123456789abcdef01234567"


def register_tiny_architectures(monkeypatch) -> None:
    """Add the tiny AIMv1 release and both tiny AIMv2 encoders to the registry for one test."""
    monkeypatch.setitem(
        REGISTRY,
        V1_NAME,
        Entry(V1_NAME, dict(V1_CONFIG), aim_v1_preprocessing(28), V1_CHECKPOINT),
    )
    for pos, name in V2_NAMES.items():
        config = {**V2_CONFIG, "pos_embed_type": pos}
        checkpoint = Checkpoint(f"apple/{name}", V2_REVISION, ("mlx_model.safetensors",))
        prep = aim_v2_preprocessing(28, native=pos == "sincos")
        monkeypatch.setitem(REGISTRY, name, Entry(name, config, prep, checkpoint))


def replace_registry_entry(monkeypatch, name: str, config: dict, **checkpoint_changes) -> Entry:
    """Keep ``name``'s released checkpoint (repo, revision, files) but give it a tiny config."""
    entry = REGISTRY[name]
    checkpoint = dataclasses.replace(entry.checkpoint, **checkpoint_changes)
    tiny = dataclasses.replace(entry, config=dict(config), checkpoint=checkpoint)
    monkeypatch.setitem(REGISTRY, name, tiny)
    return tiny


def aim_v1_reference(probe_layers=None, seed: int = 0) -> AIMv1Torch:
    """The tiny AIMv1 with its attentive probe, random weights, eval mode."""
    c = V1_CONFIG
    model = AIMv1Torch(
        c["image_size"],
        c["patch_size"],
        c["embed_dim"],
        c["num_blocks"],
        c["num_heads"],
        num_classes=V1_CLASSES,
        probe_layers=probe_layers,
    )
    return init_random_(model, seed=seed, std=0.2).eval()


def aim_v1_with_probe_layers(reference: AIMv1Torch, probe_layers) -> AIMv1Torch:
    """A copy of ``reference`` (same weights) whose head averages ``probe_layers``."""
    model = aim_v1_reference(probe_layers)
    model.load_state_dict(reference.state_dict())
    return model.eval()


def aim_v2_reference(pos_embed_type: str, seed: int = 1) -> AIMv2VisionTorch:
    """The tiny AIMv2 encoder (no head), random weights, eval mode."""
    c = V2_CONFIG
    model = AIMv2VisionTorch(
        c["image_size"],
        c["patch_size"],
        c["embed_dim"],
        c["num_blocks"],
        c["num_heads"],
        c["mlp_hidden_dim"],
        pos_embed_type=pos_embed_type,
    )
    return init_random_(model, seed=seed, std=0.2).eval()


def write_v1_release(reference: AIMv1Torch, folder: Path) -> dict[str, Path]:
    """ml-aim's AIMv1 files: backbone, head (last and best) and one merged state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    state = reference.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    paths = {
        "backbone": folder / V1_CHECKPOINT.files[0],
        "last": folder / V1_CHECKPOINT.head_files["last"],
        "best": folder / V1_CHECKPOINT.head_files["best"],
        "merged": folder / f"{V1_STEM}_merged.pth",
    }
    torch.save(backbone, paths["backbone"])
    torch.save(head, paths["last"])
    torch.save(head, paths["best"])
    torch.save(state, paths["merged"])
    return paths


def write_v2_mlaim_layout(reference: AIMv2VisionTorch, folder: Path) -> Path:
    """An AIMv2 hub folder at ml-aim's pinned revision: custom-code config.json and
    ``model.safetensors`` with ml-aim keys and the torch conv layout (D, C, p, p)."""
    folder.mkdir(parents=True, exist_ok=True)
    c = V2_CONFIG
    config = {
        "architectures": ["AIMv2Model"],
        "model_type": "aimv2",
        "hidden_size": c["embed_dim"],
        "intermediate_size": c["mlp_hidden_dim"],
        "num_hidden_layers": c["num_blocks"],
        "num_attention_heads": c["num_heads"],
        "num_channels": 3,
        "patch_size": c["patch_size"],
        "image_size": c["image_size"],
        "rms_norm_eps": 1e-5,
        "qkv_bias": False,
        "use_bias": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(reference.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
    return folder / "model.safetensors"


def write_v2_official_mlx(reference: AIMv2VisionTorch, folder: Path) -> Path:
    """The official ``mlx_model.safetensors``: ml-aim keys, MLX conv layout (D, p, p, C)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: mx.array(v.numpy()) for k, v in reference.state_dict().items()}
    key = "preprocessor.patchifier.proj.weight"
    weights[key] = weights[key].transpose(0, 2, 3, 1)
    path = folder / "mlx_model.safetensors"
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    return path


def write_v2_transformers_layout(reference: AIMv2VisionTorch, folder: Path, native: bool) -> Path:
    """A transformers ``Aimv2VisionModel`` folder (config.json + model.safetensors)."""
    from transformers import Aimv2VisionConfig

    c = V2_CONFIG
    Aimv2VisionConfig(
        hidden_size=c["embed_dim"],
        intermediate_size=c["mlp_hidden_dim"],
        num_hidden_layers=c["num_blocks"],
        num_attention_heads=c["num_heads"],
        image_size=c["image_size"],
        patch_size=c["patch_size"],
        use_head=False,
        is_native=native,
    ).save_pretrained(folder)
    state = {
        k: v.contiguous() for k, v in to_transformers_state_dict(reference.state_dict()).items()
    }
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Normal random NCHW images."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def nhwc(x: torch.Tensor) -> mx.array:
    """The MLX (NHWC) view of a torch NCHW batch."""
    return mx.array(x.numpy().transpose(0, 2, 3, 1))
