"""What the benchmark measures: model configs, their FLOPs per image, the growth cells (widths x
patches), and the weights and inputs every implementation shares."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..checkpoints.registry import get_entry, pretrain_config
from ..models import build_model_args

TASKS = ("train", "embed")
ALIASES = {"vit-s": "aim-small"}  # ViT-S-like: 224 px, patch 16, width 384, depth 12
GROWTH_WIDTHS = ("aim-tiny", "aim-small", "aim-base")
GROWTH_PATCHES = (64, 196, 256, 576)


def resolve_config(name: str, tasks: tuple[str, ...] | None) -> tuple[dict, tuple[str, ...], int]:
    """(model config, tasks, default batch) for a registry name, an alias or a config.json path.

    Architectures without released weights (the laptop configs) default to both tasks at batch 8;
    released models to inference only at batch 1. ``train`` uses the ``aim_pretrain`` config.
    A config file is taken as it is (``train`` needs an ``aim_pretrain`` config).
    """
    if name.endswith(".json"):
        config = json.loads(Path(name).read_text())
        build_model_args(config)  # validates; raises ConfigError naming the field
        trainable = config["model_type"] == "aim_pretrain"
        tasks = tasks or (TASKS if trainable else ("embed",))
        if "train" in tasks and not trainable:
            raise ValueError(f"{name}: task 'train' needs an aim_pretrain config")
        return config, tasks, 8
    entry = get_entry(ALIASES.get(name, name))
    trainable = entry.checkpoint is None
    tasks = tasks or (TASKS if trainable else ("embed",))
    config = pretrain_config(entry.name) if "train" in tasks else dict(entry.config)
    return config, tasks, 8 if trainable else 1


def encoder_config(config: dict) -> dict:
    """The trunk config of a pre-training or trunk config."""
    return config["encoder"] if config["model_type"] == "aim_pretrain" else config


def flops_per_image(config: dict, batch: int = 2) -> dict[str, float | None]:
    """Model FLOPs per image: ``embed`` (trunk forward) and ``train`` (3 x the forward of the trunk
    and of the head at the positions a batch of ``batch`` predicts: ceil(B / 2) * n of B * n)."""
    enc = encoder_config(config)
    d, p, c = enc["embed_dim"], enc["patch_size"], enc.get("num_channels", 3)
    n = (enc["image_size"] // p) ** 2
    if enc["model_type"] == "aim_v2":
        mlp = 3 * 2 * n * d * enc["mlp_hidden_dim"]
    else:
        mlp = 2 * 2 * n * d * int(enc.get("mlp_ratio", 4.0) * d)
    attention = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d
    trunk = 2 * n * p * p * c * d + enc["num_blocks"] * (attention + mlp)
    if config["model_type"] != "aim_pretrain":
        return {"embed": float(trunk), "train": None}
    w = config.get("head_width", 2048)
    hidden = int(config.get("head_mlp_ratio", 4.0) * w)
    predicted = n * ((batch + 1) // 2) / batch  # paired prefix lengths: K predictions per pair
    head = predicted * (
        2 * d * w + config.get("head_blocks", 12) * 2 * 2 * w * hidden + 2 * w * p * p * c
    )
    return {"embed": float(trunk), "train": float(3 * (trunk + head))}


def growth_cells(depth: int, batch: int) -> list[dict]:
    """Pre-training configs over widths (tiny to base) x patches per image, ``depth`` blocks."""
    cells = []
    for name in GROWTH_WIDTHS:
        base = pretrain_config(name, head_blocks=1)
        for patches in GROWTH_PATCHES:
            side = int(round(patches**0.5))
            enc = {**base["encoder"], "num_blocks": depth}
            enc["image_size"] = side * enc["patch_size"]
            config = {**base, "encoder": enc}
            cells.append(
                {
                    "arch": name,
                    "width": enc["embed_dim"],
                    "patches": patches,
                    "batch": batch,
                    "config": config,
                    "flops_per_image": flops_per_image(config, batch)["train"],
                }
            )
    return cells


# ---- shared weights and inputs -------------------------------------------------------------------


def write_shared_state(config: dict, batch: int, seed: int, folder: Path) -> tuple[Path, Path]:
    """Initial weights of mlx-aim's model for ``config`` and one input batch, as safetensors."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..models import build_model
    from ..objectives.next_patch import sample_paired_prefix_lengths

    mx.random.seed(seed)
    model = build_model(config)
    weights = folder / "weights.safetensors"
    mx.save_safetensors(str(weights), dict(tree_flatten(model.parameters())))
    enc = encoder_config(config)
    size, k = enc["image_size"], (enc["image_size"] // enc["patch_size"]) ** 2
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, size, size, enc.get("num_channels", 3)), np.float32)
    prefix = sample_paired_prefix_lengths(batch, k, key=mx.random.key(seed))
    inputs = folder / "inputs.safetensors"
    mx.save_safetensors(str(inputs), {"images": mx.array(images), "prefix_lengths": prefix})
    return weights, inputs
