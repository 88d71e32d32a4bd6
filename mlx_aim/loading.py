"""``mlx_aim.load``: one entry point for converted directories, foreign checkpoints and hub names."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .registry import REGISTRY, default_preprocessing
from .tokenizer import has_tokenizer, load_tokenizer
from .weights import CONFIG_FILE, load_model

# config.json model types of checkpoints that are converted on the fly.
FOREIGN_MODEL_TYPES = ("aimv2_vision_model", "aimv2", "aimv2_text_model")


def _is_mlx_aim_dir(path: Path) -> bool:
    """A directory in mlx-aim's own format (its config names one of our model types)."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return (path / CONFIG_FILE).is_file()  # unreadable: let load_model report it
    return not isinstance(config, dict) or config.get("model_type") not in FOREIGN_MODEL_TYPES


def _attach_tokenizer(model: nn.Module, folder: Path | None) -> None:
    """Set ``model.tokenizer`` of a LiT model from the tokenizer files in ``folder``, if any.

    Without the optional ``tokenizers`` package it stays None; what needs it names the package.
    """
    if model.args.model_type != "aim_v2_lit" or folder is None or not has_tokenizer(folder):
        return
    try:
        model.tokenizer = load_tokenizer(folder, model.args.max_context_length)
    except ImportError:
        pass


def load(
    path_or_name: str | Path,
    *,
    revision: str | None = None,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    head: str | None = None,
) -> nn.Module:
    """Load a model ready for inference (eval mode) with ``model.preprocessing`` set.

    ``path_or_name`` is one of:
      - an mlx-aim model directory (``config.json`` + ``model.safetensors``), e.g. the output
        directory of ``mlx-aim train`` or ``mlx-aim convert``;
      - a foreign checkpoint converted on the fly: an ml-aim ``.pth`` file, a Hugging Face
        safetensors file or directory (ml-aim or transformers layout, official ``mlx_model``);
      - a registry name such as ``"aimv2-large-patch14-224"`` or ``"aim-600M"``, read through the
        Hugging Face cache (``HF_HUB_OFFLINE=1`` works once cached).

    The AIMv2 LiT model (``"aimv2-large-patch14-224-lit"``) also gets ``model.tokenizer`` from the
    checkpoint's tokenizer files (needs ``pip install 'mlx-aim[text]'``).

    ``head`` picks the AIMv1 probe head of a released checkpoint (``"last"`` or ``"best"``).
    """
    source = Path(path_or_name).expanduser()
    if _is_mlx_aim_dir(source):
        model = load_model(source, dtype=dtype, lazy=True)
        _attach_tokenizer(model, source)
    elif source.exists() or str(path_or_name) in REGISTRY:
        from .convert import build_imported, import_checkpoint

        imported = import_checkpoint(path_or_name, revision=revision, probe_layers=head)
        model = build_imported(imported, path_or_name, dtype)
        model.eval()
        model.preprocessing = imported.preprocessing
        _attach_tokenizer(model, imported.tokenizer_dir)
    else:
        raise FileNotFoundError(
            f"{path_or_name}: no such file or directory, and not a known model name "
            f"(see `mlx-aim models`; e.g. {', '.join(list(REGISTRY)[:3])})"
        )
    if model.preprocessing is None:
        model.preprocessing = default_preprocessing(model.args.to_dict())
    if not lazy:
        mx.eval(model.parameters())
    return model
