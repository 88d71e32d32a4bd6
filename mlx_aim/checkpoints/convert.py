"""Import released AIM checkpoints into mlx-aim's format.

Sources (``import_checkpoint``):
- ml-aim ``.pth`` state dicts (AIMv1 backbone, optionally with a probe-head file, or one merged dict),
  read with ``torch.load(weights_only=True)``; torch is needed for this path only;
- safetensors in the ml-aim layout (``apple/aim*`` / ``apple/aimv2-*`` at ml-aim's pinned revisions,
  and the official ``mlx_model.safetensors``), read without torch;
- safetensors in the transformers ``Aimv2VisionModel`` layout (with its ``config.json``);
- a registry name (``aimv2-large-patch14-224``, ``aim-600M``) or hub repo id, via the local HF cache;
- the AIMv2 LiT dual encoder in the ml-aim ``AIMv2LiT`` layout (``image_encoder.*``,
  ``text_encoder.*``) or the transformers ``Aimv2Model`` layout (``vision_model.*``,
  ``text_model.*``), with the tokenizer files found beside the weights.

Every import is strict: each source tensor must land on a parameter and each parameter must be
filled with the right shape (checked by ``weights.check_weights`` when the model is built).
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..data.transforms import Preprocessing
from ..errors import InputError
from ..io import check_destination, check_regular_file, read_json
from ..models import build_model
from ..models.base import ConfigError
from ..text.clip_tokenizer import BPE_FILES, copy_tokenizer_files, has_tokenizer
from .hub import fetch
from .registry import (
    LIT_NAME,
    REGISTRY,
    Entry,
    aim_v2_preprocessing,
    default_preprocessing,
    get_entry,
)
from .weights import (
    CONFIG_FILE,
    INDEX_FILE,
    WEIGHTS_FILE,
    WeightsError,
    apply_weights,
    check_finite,
    is_safetensors,
    read_safetensors,
    save_model,
    weight_files,
)

TRANSFORMERS_RENAMES = [
    (r"^embeddings\.patch_embed\.", "preprocessor.patchifier.proj."),
    (r"^embeddings\.rms_norm\.", "preprocessor.patchifier.norm."),
    (r"^encoder\.layers\.(\d+)\.attention\.out_proj\.", r"trunk.blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.ffn\.gate_proj\.", r"trunk.blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.(\d+)\.ffn\.up_proj\.", r"trunk.blocks.\1.mlp.fc3."),
    (r"^encoder\.layers\.(\d+)\.ffn\.down_proj\.", r"trunk.blocks.\1.mlp.fc2."),
    (r"^encoder\.layers\.(\d+)\.rms_norm1\.", r"trunk.blocks.\1.norm_1."),
    (r"^encoder\.layers\.(\d+)\.rms_norm2\.", r"trunk.blocks.\1.norm_2."),
    (r"^rms_norm\.", "trunk.post_trunk_norm."),
    (r"^head\.cls_token$", "pooling_head.cls_token"),
    (r"^head\.([kv])_proj\.", r"pooling_head.\1."),
    (r"^head\.output_proj\.", "pooling_head.linear."),
]

# transformers ``Aimv2Model`` keys outside the two trunks -> ml-aim ``AIMv2LiT`` keys.
TRANSFORMERS_LIT_RENAMES = [
    (r"^vision_model\.head\.cls_token$", "image_encoder.head.cls_token"),
    (r"^vision_model\.head\.k_proj\.", "image_encoder.head.k."),
    (r"^vision_model\.head\.v_proj\.", "image_encoder.head.v."),
    (r"^vision_model\.head\.output_proj\.", "image_encoder.head.linear."),
    (
        r"^text_model\.embeddings\.token_embedding\.weight$",
        "text_encoder.preprocessor.text_embedding.weight",
    ),
    (
        r"^text_model\.embeddings\.position_embedding\.weight$",
        "text_encoder.preprocessor.positional_embedding",
    ),
    (r"^visual_projection\.", "image_projector."),
    (r"^text_projection\.", "text_projector."),
    (r"^logit_scale$", "log_logit_scale"),
]
TEXT_TOWER_PREFIXES = ("text_model.", "text_encoder.")


@dataclass
class ImportedCheckpoint:
    """A foreign checkpoint as mlx-aim config + weights (ml-aim keys) + preprocessing."""

    config: dict[str, Any]
    weights: dict[str, mx.array]
    preprocessing: Preprocessing
    tokenizer_dir: Path | None = None  # LiT: where the tokenizer files are


def read_pth(path: str | Path) -> dict[str, mx.array]:
    """Tensors of a PyTorch state dict, loaded safely (``weights_only=True``, no code execution)."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path}: reading .pth files needs PyTorch (pip install 'mlx-aim[torch]'); "
            "safetensors sources need no torch"
        ) from None
    check_regular_file(path)
    try:
        with warnings.catch_warnings():  # torch's UserWarnings on load are not for our users
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object, a callable or an opcode
        found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(e))
        raise WeightsError(
            f"{path}: refused: not a plain tensor state dict "
            f"({found.group(0) if found else 'unsupported pickle content'}); .pth files are read "
            "with torch.load(weights_only=True), so pickled objects and code never load or run"
        ) from None
    except Exception as e:  # corrupt or truncated archives raise various types
        reason = (str(e).strip().splitlines() or [""])[0]
        raise WeightsError(
            f"{path}: not a readable PyTorch file, truncated or corrupt ({type(e).__name__}: "
            f"{reason})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return {
        k: mx.array((v.detach().float() if v.is_floating_point() else v.detach()).numpy())
        for k, v in state.items()
    }


def from_transformers(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map transformers ``Aimv2VisionModel`` keys to ml-aim keys (q/k/v fused into qkv; the
    attention-pooling head of ``use_head=True`` becomes ``pooling_head``)."""
    out: dict[str, mx.array] = {}
    qkv: dict[str, dict[str, mx.array]] = {}
    for key, value in weights.items():
        if key == "embeddings.position_embedding.weight":
            out["preprocessor.pos_embed"] = value[None]
            continue
        match = re.match(r"^encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.weight$", key)
        if match:
            qkv.setdefault(match.group(1), {})[match.group(2)] = value
            continue
        new = key
        for pattern, replacement in TRANSFORMERS_RENAMES:
            new = re.sub(pattern, replacement, new)
        out[new] = value
    for block, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsError(f"block {block}: attention needs q, k and v, found {sorted(parts)}")
        out[f"trunk.blocks.{block}.attn.qkv.weight"] = mx.concatenate(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out


def lit_from_transformers(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map transformers ``Aimv2Model`` keys to ml-aim ``AIMv2LiT`` keys."""
    out: dict[str, mx.array] = {}
    towers: dict[str, dict[str, mx.array]] = {"vision_model.": {}, "text_model.": {}}
    for key, value in weights.items():
        new = key
        for pattern, replacement in TRANSFORMERS_LIT_RENAMES:
            new = re.sub(pattern, replacement, new)
        tower = next((t for t in towers if key.startswith(t)), None)
        if new != key or tower is None:
            out[new] = value
        else:
            towers[tower][key.removeprefix(tower)] = value
    for tower, ours in (("vision_model.", "image_encoder."), ("text_model.", "text_encoder.")):
        out.update({ours + k: v for k, v in from_transformers(towers[tower]).items()})
    return out


def _lit_transformers_config(hf: dict[str, Any]) -> dict[str, Any]:
    text = hf.get("text_config") or {}
    try:
        return {
            "model_type": "aim_v2_lit",
            "vision": _transformers_config(hf),
            "text_embed_dim": text["hidden_size"],
            "text_num_blocks": text["num_hidden_layers"],
            "text_num_heads": text["num_attention_heads"],
            "text_mlp_hidden_dim": text["intermediate_size"],
            "vocab_size": text["vocab_size"],
            "max_context_length": text.get("max_position_embeddings", 77),
            "eos_token_id": text.get("eos_token_id", 49407),
            "projection_dim": hf.get("projection_dim", 512),
            "max_logit_scale": float(hf.get("max_logit_scale", 100.0)),
        }
    except KeyError as e:
        raise ConfigError(f"transformers config lacks text_config field {e}") from None


def _interpret_lit(
    weights: dict[str, mx.array], hf_config: dict[str, Any] | None, arch: str | None
) -> ImportedCheckpoint:
    """An AIMv2 LiT checkpoint in either layout; without a config, the registered architecture."""
    if any(k.startswith("text_model.") for k in weights):
        weights = lit_from_transformers(weights)
    if arch is not None:
        config = dict(get_entry(arch).config)
    elif hf_config is not None and hf_config.get("model_type") == "aimv2":
        config = _lit_transformers_config(hf_config)
    elif hf_config is not None and hf_config.get("model_type") == "aim_v2_lit":
        config = hf_config  # an mlx-aim directory
    else:
        config = dict(get_entry(LIT_NAME).config)
    if config.get("model_type") != "aim_v2_lit":
        raise WeightsError(f"has a text tower, but {arch} is not a LiT architecture")
    return ImportedCheckpoint(config, weights, aim_v2_preprocessing(config["vision"]["image_size"]))


def _transformers_config(hf: dict[str, Any]) -> dict[str, Any]:
    hf = hf.get("vision_config", hf)
    try:
        return {
            "model_type": "aim_v2",
            "image_size": hf.get("image_size", 224),
            "patch_size": hf.get("patch_size", 14),
            "num_channels": hf.get("num_channels", 3),
            "embed_dim": hf["hidden_size"],
            "num_blocks": hf["num_hidden_layers"],
            "num_heads": hf["num_attention_heads"],
            "mlp_hidden_dim": hf["intermediate_size"],
            "pos_embed_type": "sincos" if hf.get("is_native") else "absolute",
        }
    except KeyError as e:
        raise ConfigError(f"transformers config lacks field {e}") from None


def _block_count(weights: dict[str, mx.array]) -> int:
    ids = {int(m.group(1)) for k in weights if (m := re.match(r"trunk\.blocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def infer_config(weights: dict[str, mx.array], arch: str | None = None) -> dict[str, Any]:
    """Architecture of ml-aim-layout weights: from ``arch`` or by matching registry shapes.

    Head counts cannot be read off shapes, so an unregistered shape needs ``arch``.
    """
    if arch is not None:
        return dict(get_entry(arch).config)
    proj = weights.get("preprocessor.patchifier.proj.weight")
    if proj is None:
        raise WeightsError("no 'preprocessor.patchifier.proj.weight': not an AIM vision checkpoint")
    dim, blocks = proj.shape[0], _block_count(weights)
    patch = proj.shape[2]  # (D, C, p, p) in torch, (D, p, p, C) in MLX
    is_v2 = "trunk.blocks.0.mlp.fc3.weight" in weights
    pos = weights.get("preprocessor.pos_embed")
    for entry in REGISTRY.values():
        c = entry.config
        if c["model_type"] not in ("aim_v1", "aim_v2") or (c["model_type"] == "aim_v2") != is_v2:
            continue
        if (c["embed_dim"], c["num_blocks"], c["patch_size"]) != (dim, blocks, patch):
            continue
        if is_v2 and (pos is None) != (c["pos_embed_type"] == "sincos"):
            continue
        if pos is not None and pos.shape[1] != c["image_size"] ** 2 // patch**2:
            continue
        return dict(c)
    raise WeightsError(
        f"no registered architecture has width {dim}, {blocks} blocks and patch {patch}; "
        "pass --arch NAME (see `mlx-aim models`)"
    )


def _attach_head(
    config: dict[str, Any], weights: dict[str, mx.array], probe_layers: str | None, best: tuple
) -> dict[str, Any]:
    """Set ``num_classes``/``probe_layers`` when the weights carry an AIMv1 probe head."""
    if "head.linear.weight" not in weights:
        if probe_layers:
            raise WeightsError("--probe-layers was given but the checkpoint has no probe head")
        return config
    config = {**config, "num_classes": int(weights["head.linear.weight"].shape[0])}
    if probe_layers == "best":
        if not best:
            raise WeightsError("'best' probe layers are only known for released AIMv1 models")
        config["probe_layers"] = list(best)
    elif probe_layers not in (None, "last"):
        try:
            config["probe_layers"] = [int(i) for i in probe_layers.split(",")]
        except ValueError:
            raise ConfigError(
                f"probe layers must be 'last', 'best' or block indices such as 14,15,16; "
                f"got {probe_layers!r}"
            ) from None
    return config


def _entry_for(config: dict[str, Any]) -> Entry | None:
    """The first registry entry with exactly this architecture (positions and size included)."""
    return next(
        (e for e in REGISTRY.values() if all(config.get(k) == v for k, v in e.config.items())),
        None,
    )


def _read_weight_files(files: list[Path]) -> dict[str, mx.array]:
    """Tensors of safetensors and PyTorch files, told apart by their content, not their name."""
    weights: dict[str, mx.array] = {}
    for file in files:
        if is_safetensors(file) or file.suffix not in (".pth", ".pt", ".bin"):
            tensors = read_safetensors(file)[0]
        else:
            tensors = read_pth(file)
        overlap = set(weights) & set(tensors)
        if overlap:
            raise WeightsError(
                f"{file}: tensors also present in another file: {sorted(overlap)[:3]}"
            )
        weights.update(tensors)
    return weights


def _from_files(
    files: list[Path],
    hf_config: dict[str, Any] | None,
    arch: str | None,
    probe_layers: str | None,
) -> ImportedCheckpoint:
    weights = _read_weight_files(files)  # read errors name their file
    try:
        return _interpret(weights, files, hf_config, arch, probe_layers)
    except (WeightsError, ConfigError) as e:
        raise type(e)(f"{files[0]}: {e}") from None


def _interpret(
    weights: dict[str, mx.array],
    files: list[Path],
    hf_config: dict[str, Any] | None,
    arch: str | None,
    probe_layers: str | None,
) -> ImportedCheckpoint:
    if any(k.startswith(TEXT_TOWER_PREFIXES) for k in weights):
        return _interpret_lit(weights, hf_config, arch)
    weights = {k.removeprefix("vision_model."): v for k, v in weights.items()}
    if any(k.startswith(("embeddings.", "encoder.layers.")) for k in weights):
        if hf_config is None and arch is None:
            raise WeightsError(
                "transformers-layout weights need their config.json beside them or --arch NAME"
            )
        config = (
            dict(get_entry(arch).config) if arch is not None else _transformers_config(hf_config)
        )
        weights = from_transformers(weights)
        if any(k.startswith("pooling_head.") for k in weights):
            config["pooling_head"] = True
    else:
        config = infer_config(weights, arch)
    if probe_layers is None and any("head_best_layers" in f.name for f in files):
        probe_layers = "best"
    entry = _entry_for(config)
    config = _attach_head(
        config,
        weights,
        probe_layers,
        entry.checkpoint.best_layers if entry and entry.checkpoint else (),
    )
    preprocessing = entry.preprocessing if entry else default_preprocessing(config)
    if config.get("pos_embed_type") == "absolute" and "preprocessor.pos_embed" in weights:
        n = weights["preprocessor.pos_embed"].shape[1]
        size = int(round(np.sqrt(n))) * config["patch_size"]
        if size != config["image_size"]:
            config["image_size"] = size
            preprocessing = default_preprocessing(config)
    return ImportedCheckpoint(config, weights, preprocessing)


def _hub_files(name: str, revision: str | None, head: str | None) -> tuple[list[Path], str]:
    entry = get_entry(name)
    ckpt = entry.checkpoint
    if ckpt is None:
        raise WeightsError(f"{name} is an architecture without released weights; train it instead")
    if head is not None and head not in ckpt.head_files:
        released = ", ".join(ckpt.head_files) or "none"
        raise WeightsError(f"{name} has no released probe head {head!r} (released: {released})")
    revision = revision or ckpt.revision
    files = [fetch(ckpt.repo, ckpt.files[0], revision)]
    if head is not None:
        files.append(fetch(ckpt.repo, ckpt.head_files[head], revision))
    return files, name


def _hub_tokenizer(entry: Entry, revision: str | None) -> Path:
    """The folder of a released LiT checkpoint's tokenizer files (cached or downloaded)."""
    ckpt = entry.checkpoint
    paths = [fetch(ckpt.repo, name, revision or ckpt.revision) for name in BPE_FILES]
    return paths[0].parent  # every file of one revision lands in its snapshot folder


def import_checkpoint(
    source: str | Path,
    *,
    head: str | Path | None = None,
    arch: str | None = None,
    probe_layers: str | None = None,
    revision: str | None = None,
) -> ImportedCheckpoint:
    """Read any supported checkpoint as an :class:`ImportedCheckpoint` (nothing written).

    Args:
        source: a ``.pth``/``.safetensors`` file, a directory holding one (with ``config.json`` for
            the transformers layout), a registry name or a hub repo id.
        head: an ml-aim probe-head ``.pth`` file merged with a backbone file; for a registry name
            of an AIMv1 release, ``"last"`` or ``"best"`` picks the released head.
        arch: registry architecture for sources without a config (``.pth`` files).
        probe_layers: ``last``, ``best`` or ``i,j,k`` for the AIMv1 probe head.
        revision: hub revision (default: the one ml-aim pins).
    """
    name = str(source)
    path = Path(source).expanduser()
    if not path.exists() and name in REGISTRY:
        head_name = str(head) if head is not None else probe_layers
        files, name = _hub_files(name, revision, head_name)
        entry = get_entry(name)
        imported = _from_files(files, None, name, head_name)
        imported.preprocessing = entry.preprocessing
        if imported.config["model_type"] == "aim_v2_lit":
            imported.tokenizer_dir = _hub_tokenizer(entry, revision)
        return imported
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        match = next(
            (e for e in REGISTRY.values() if e.checkpoint and e.checkpoint.repo == name), None
        )
        if match is not None:
            return import_checkpoint(
                match.name, head=head, probe_layers=probe_layers, revision=revision
            )
        raise WeightsError(f"{name}: unknown hub repo; download it and pass the directory")
    if not path.exists():
        raise InputError(f"{source}: no such file, directory or model name")
    hf_config = None
    if path.is_dir():
        if (path / CONFIG_FILE).exists():
            hf_config = _read_config(path / CONFIG_FILE)
        if (path / INDEX_FILE).exists():
            files = sorted(set(weight_files(path).values()))
        else:
            candidates = [WEIGHTS_FILE, "mlx_model.safetensors", "pytorch_model.bin"]
            found = [path / c for c in candidates if (path / c).exists()]
            if not found:
                raise WeightsError(f"{path}: no {' / '.join(candidates)} inside")
            files = found[:1]
    else:
        files = [path]
        if (path.parent / CONFIG_FILE).exists() and path.suffix == ".safetensors":
            hf_config = _read_config(path.parent / CONFIG_FILE)
    if head is not None:
        files.append(Path(head).expanduser())
    if hf_config is not None and hf_config.get("model_type") in ("aim_v1", "aim_v2"):
        hf_config = None  # an mlx-aim directory: its weights carry ml-aim keys
    imported = _from_files(files, hf_config, arch, probe_layers)
    if imported.config["model_type"] == "aim_v2_lit":
        folder = path if path.is_dir() else path.parent
        imported.tokenizer_dir = folder if has_tokenizer(folder) else None
    return imported


def _read_config(file: Path) -> dict[str, Any]:
    config = read_json(file)
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: a model config must be a JSON object")
    return config


def build_imported(
    imported: ImportedCheckpoint, source: str | Path, dtype: mx.Dtype | None = None
) -> nn.Module:
    """The model of an imported checkpoint with its weights in place, checked to be finite and
    evaluated; errors name ``source``."""
    model = build_model(imported.config)
    try:
        apply_weights(model, imported.weights, dtype)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    check_finite(model, lambda key: source)
    return model


def convert(
    source: str | Path,
    destination: str | Path,
    *,
    head: str | Path | None = None,
    arch: str | None = None,
    probe_layers: str | None = None,
    revision: str | None = None,
    dtype: mx.Dtype | None = None,
    force: bool = False,
) -> Path:
    """Import ``source`` and write it to ``destination`` in mlx-aim's format (refuses to overwrite
    unless ``force``)."""
    destination = check_destination(destination, overwrite=force, directory=True)
    imported = import_checkpoint(
        source, head=head, arch=arch, probe_layers=probe_layers, revision=revision
    )
    model = build_imported(imported, source, dtype)
    saved = save_model(model, destination, preprocessing=imported.preprocessing, overwrite=force)
    if imported.tokenizer_dir is not None:
        copy_tokenizer_files(imported.tokenizer_dir, saved)
    return saved
