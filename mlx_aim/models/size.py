"""How large a model config is, estimated before the model is built, and the check that it fits
in this machine's memory (a config asking for 10^9 blocks is refused, not allocated)."""

from __future__ import annotations

import os
from typing import Any

from mlx.utils import tree_flatten

from ..random_key import unchanged_random_key
from . import get_model_class, parse_model_args
from .base import ConfigError

# Fields that repeat a block: the model's size is linear in each.
_REPEATED = (("num_blocks",), ("head_blocks",), ("encoder", "num_blocks"))
# Memory a parameter tensor takes before its values exist (the lazy initialiser's graph), measured
# at about 9 KiB; it matters for configs with very many tiny blocks.
TENSOR_OVERHEAD_BYTES = 10 * 2**10
MIN_BYTES_PER_PARAMETER = 2  # bfloat16 / float16, the least any supported dtype needs


def _count(config: dict[str, Any]) -> tuple[int, int]:
    """(parameters, tensors) of a model built lazily: no parameter memory is allocated.

    Building draws initial values from MLX's global random key; the key is put back, so an
    estimate never changes what a seeded run draws next (resumed training stays bit-exact).
    """
    args = parse_model_args(config)
    with unchanged_random_key():
        params = tree_flatten(get_model_class(args.model_type)(args).parameters())
    return sum(v.size for _, v in params), len(params)


def _with(config: dict[str, Any], keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    if len(keys) == 1:
        return {**config, keys[0]: value}
    return {**config, keys[0]: _with(config[keys[0]], keys[1:], value)}


def _get(config: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        config = config.get(key) if isinstance(config, dict) else None
    return config


def estimate_size(config: dict[str, Any]) -> tuple[int, int]:
    """(parameters, tensors) of a valid config, without building it: models of one and two
    blocks are built lazily and the counts extrapolated linearly in each block count."""
    repeated = [keys for keys in _REPEATED if isinstance(_get(config, keys), int)]
    small = {**config, "probe_layers": None} if "probe_layers" in config else config
    for keys in repeated:
        small = _with(small, keys, 1)
    params, tensors = base = _count(small)
    for keys in repeated:
        two = _count(_with(small, keys, 2))
        params += (_get(config, keys) - 1) * (two[0] - base[0])
        tensors += (_get(config, keys) - 1) * (two[1] - base[1])
    return params, tensors


def estimate_parameters(config: dict[str, Any]) -> int:
    """The number of parameters a valid config describes (see :func:`estimate_size`)."""
    return estimate_size(config)[0]


def physical_memory() -> int:
    """Bytes of memory of this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_model_size(config: dict[str, Any]) -> None:
    """Refuse a valid config whose model cannot fit in this machine's memory (ConfigError naming
    the largest field), before anything is allocated."""
    key, value = max(_int_fields(config), key=lambda item: item[1])
    try:
        params, tensors = estimate_size(config)
    except (OverflowError, ValueError):  # a dimension beyond MLX's 32-bit sizes
        raise ConfigError(
            f"the model has a dimension above MLX's limit of 2**31 - 1 (largest field: {key!r} "
            f"= {value})"
        ) from None
    needed = params * MIN_BYTES_PER_PARAMETER + tensors * TENSOR_OVERHEAD_BYTES
    memory = physical_memory()
    if needed > memory:
        raise ConfigError(
            f"the model has {params:.3g} parameters in {tensors:.3g} tensors, at least "
            f"{needed / 2**30:.3g} GiB: more than this machine's {memory / 2**30:.3g} GiB of "
            f"memory (largest field: {key!r} = {value})"
        )


def _int_fields(config: dict[str, Any], prefix: str = "") -> list[tuple[str, int]]:
    fields = []
    for key, value in config.items():
        if isinstance(value, dict):
            fields += _int_fields(value, f"{prefix}{key}.")
        elif isinstance(value, int) and not isinstance(value, bool):
            fields.append((prefix + key, value))
    return fields
