"""Model architectures, one module per ``model_type`` (mlx-lm style)."""

from __future__ import annotations

import importlib
from typing import Any

from .base import BaseModelArgs, ConfigError

MODEL_TYPES = {
    "aim_v1": "aim_v1",
    "aim_v2": "aim_v2",
    "aim_pretrain": "pretrain",
    "aim_v2_lit": "aim_v2_lit",
    "aimv2_pretrain": "aimv2_pretrain",
}


def _module(model_type: Any):
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"field 'model_type' is {model_type!r}; known types: {', '.join(MODEL_TYPES)}"
        )
    return importlib.import_module(f"{__name__}.{MODEL_TYPES[model_type]}")


def build_model_args(config: dict[str, Any]) -> BaseModelArgs:
    """Validated ``ModelArgs`` of the config's ``model_type``; a model that cannot fit in this
    machine's memory is refused too (see :func:`~mlx_aim.models.size.check_model_size`)."""
    from .size import check_model_size  # size builds small models through this module

    args = parse_model_args(config)
    check_model_size(config)
    return args


def parse_model_args(config: dict[str, Any]) -> BaseModelArgs:
    """``ModelArgs`` of a config, each field checked (but not the model's size)."""
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a JSON object, got {type(config).__name__}")
    return _module(config.get("model_type")).ModelArgs.from_dict(config)


def get_model_class(model_type: str):
    """The ``Model`` class of a ``model_type``."""
    return _module(model_type).Model


def build_model(config: dict[str, Any]):
    """A randomly initialised model for a config dict (refused if it cannot fit in memory)."""
    args = build_model_args(config)
    return get_model_class(args.model_type)(args)
