"""``mlx_aim.load``: one entry point for model directories, training checkpoints, foreign
checkpoints and hub names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..data.transforms import Preprocessing
from ..errors import InputError
from ..io import FileRefused, check_regular_file, read_json
from ..models import build_model
from ..models.base import ConfigError
from ..text.clip_tokenizer import has_tokenizer, load_tokenizer
from .registry import REGISTRY, default_preprocessing
from .weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WeightsError,
    apply_weights,
    check_finite,
    load_model,
    read_safetensors,
)

# config.json model types of checkpoints that are converted on the fly.
FOREIGN_MODEL_TYPES = ("aimv2_vision_model", "aimv2", "aimv2_text_model")
ENCODER_PREFIX = "encoder."  # the trunk's keys inside a pre-training model's weights


def _is_mlx_aim_dir(path: Path) -> bool:
    """A directory in mlx-aim's own format (its config names one of our model types)."""
    if not (path / CONFIG_FILE).exists() and not (path / CONFIG_FILE).is_symlink():
        return False
    try:
        config = read_json(path / CONFIG_FILE)
    except InputError:
        return True  # unreadable: let load_model report it
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


def _is_training_checkpoint(path: Path) -> bool:
    """A checkpoint folder written by ``mlx-aim train`` (``checkpoints/step-N``)."""
    if (path / CONFIG_FILE).exists():
        return False
    from ..train.checkpoint import INTEGRITY_FILE, STATE_FILE

    return all((path / name).exists() for name in (INTEGRITY_FILE, STATE_FILE, WEIGHTS_FILE))


def load_training_checkpoint(path: str | Path, dtype: mx.Dtype | None = None) -> nn.Module:
    """The trunk of a training checkpoint (``runs/x/checkpoints/step-N``), in eval mode.

    Every file is first verified against the checkpoint's sha256 list; the pixel head is left
    out. ``preprocessing`` is the run's (``run.json`` two folders up), else the family default.
    """
    from ..train.checkpoint import INTEGRITY_FILE, STATE_FILE, verify_checkpoint

    path = Path(path)
    for name in (INTEGRITY_FILE, STATE_FILE):
        check_regular_file(path / name, 64 * 2**20)
    try:
        state = verify_checkpoint(path)[STATE_FILE]
    except ValueError as e:
        raise WeightsError(f"{path}: damaged training checkpoint ({e})") from None
    config = state.get("model_config") if isinstance(state, dict) else None
    if not isinstance(config, dict) or config.get("model_type") != "aim_pretrain":
        raise WeightsError(f"{path}: the checkpoint's state.json has no aim_pretrain model_config")
    encoder = config.get("encoder")
    try:
        model = build_model(encoder)
    except ConfigError as e:
        raise ConfigError(f"{path / STATE_FILE}: encoder: {e}") from None
    tensors = read_safetensors(path / WEIGHTS_FILE)[0]
    trunk = {
        k[len(ENCODER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)
    }
    try:
        apply_weights(model, trunk, dtype)
    except WeightsError as e:
        raise WeightsError(f"{path / WEIGHTS_FILE}: {e}") from None
    check_finite(model, lambda key: path / WEIGHTS_FILE)
    model.eval()
    model.preprocessing = _run_preprocessing(path.parent.parent, encoder)
    return model


def _run_preprocessing(run: Path, encoder: dict[str, Any]) -> Preprocessing:
    """The preprocessing a run trained with (its ``run.json``), else the family default."""
    from ..train.run import RUN_FILE

    default = default_preprocessing(encoder)
    if not (run / RUN_FILE).exists():
        return default
    info = read_json(run / RUN_FILE)
    saved = info.get("preprocessing") if isinstance(info, dict) else None
    if saved is None:
        return default
    try:
        return Preprocessing.from_dict(saved, default)
    except InputError as e:
        raise InputError(f"{run / RUN_FILE}: {e}") from None


def _refuse_unexported_run(path: Path) -> None:
    """A training run whose trunk is not exported yet (still running, or stopped): name the
    checkpoint to load instead."""
    if (path / CONFIG_FILE).exists():
        return
    from ..train.checkpoint import list_checkpoints

    found = list_checkpoints(path)
    if found:
        raise InputError(
            f"{path}: a training run with no exported model yet (it is written when the run "
            f"ends); load one of its checkpoints instead, e.g. {found[0][1]}"
        )


def load(
    path_or_name: str | Path,
    *,
    revision: str | None = None,
    dtype: mx.Dtype | None = None,
    head: str | None = None,
) -> nn.Module:
    """Load a model ready for inference (eval mode) with ``model.preprocessing`` set.

    ``path_or_name`` is one of:
      - an mlx-aim model directory (``config.json`` + ``model.safetensors``), e.g. the output
        directory of ``mlx-aim train``, ``convert`` or ``probe``;
      - a training checkpoint ``runs/NAME/checkpoints/step-N`` (its trunk);
      - a foreign checkpoint converted on the fly: an ml-aim ``.pth`` file, a Hugging Face
        safetensors file or directory (ml-aim or transformers layout, official ``mlx_model``);
      - a registry name such as ``"aimv2-large-patch14-224"`` or ``"aim-600M"``, read through the
        Hugging Face cache (``HF_HUB_OFFLINE=1`` works once cached).

    The AIMv2 LiT model (``"aimv2-large-patch14-224-lit"``) also gets ``model.tokenizer`` from the
    checkpoint's tokenizer files (needs ``pip install 'mlx-aim[text]'``).

    ``head`` picks the AIMv1 probe head of a released checkpoint (``"last"`` or ``"best"``).
    Weights are read, checked (shapes, dtypes, finite values) and evaluated.
    """
    source = Path(path_or_name).expanduser()
    if source.is_dir():
        _refuse_unexported_run(source)
    if source.is_dir() and _is_training_checkpoint(source):
        model = load_training_checkpoint(source, dtype)
    elif source.is_dir() and _is_mlx_aim_dir(source):
        model = load_model(source, dtype=dtype)
        _attach_tokenizer(model, source)
    elif source.exists() or str(path_or_name) in REGISTRY:
        from .convert import build_imported, import_checkpoint

        imported = import_checkpoint(path_or_name, revision=revision, probe_layers=head)
        model = build_imported(imported, path_or_name, dtype)
        model.eval()
        model.preprocessing = imported.preprocessing
        _attach_tokenizer(model, imported.tokenizer_dir)
    elif source.is_symlink():
        raise FileRefused(source, "broken symbolic link")
    else:
        raise InputError(
            f"{path_or_name}: no such file or directory, and not a known model name "
            f"(see `mlx-aim models`; e.g. {', '.join(list(REGISTRY)[:3])})"
        )
    if model.preprocessing is None:
        model.preprocessing = default_preprocessing(model.args.to_dict())
    return model
