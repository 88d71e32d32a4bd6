"""mlx-aim's weight format: a directory with ``config.json`` and ``model.safetensors`` (or shards).

Layout (as mlx-lm): ``config.json`` (sorted keys, with ``model_type``), ``model.safetensors`` or
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json`` above
``MAX_SHARD_BYTES``, and ``preprocess.json`` (how to prepare images). Keys follow apple/ml-aim.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..data.transforms import Preprocessing
from ..errors import InputError
from ..io import atomic_directory, open_regular, read_json, write_json
from ..io import replace_directory as replace_directory  # re-exported for train.checkpoint
from ..models import build_model, build_model_args
from ..models.base import ConfigError
from .registry import default_preprocessing

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PREPROCESS_FILE = "preprocess.json"
MAX_SHARD_BYTES = 5 * 2**30
MAX_HEADER_BYTES = 100 * 2**20

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class WeightsError(InputError):
    """Weights that do not fit a model or a file that is not valid; the message names the cause."""


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """Validate a safetensors header against the file before any tensor is read.

    Refuses anything but a regular file, unknown dtypes, shapes that disagree with their byte
    ranges, and offsets that overlap or run past the end of the file. Returns the parsed header.
    """
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        header_len = _header_length(f.read(8), size)
        if header_len is None:
            raise WeightsError(f"{path}: not a safetensors file ({size} bytes, no valid header)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in _DTYPE_BYTES:
            raise WeightsError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WeightsError(f"{path}: tensor {name!r} has an invalid shape {shape}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise WeightsError(
                f"{path}: tensor {name!r} byte range [{begin}, {end}) lies outside the "
                f"{data_size} data bytes (truncated or corrupt file)"
            )
        if math.prod(shape) * _DTYPE_BYTES[dtype] != end - begin:
            raise WeightsError(
                f"{path}: tensor {name!r} of shape {shape} and dtype {dtype} needs "
                f"{math.prod(shape) * _DTYPE_BYTES[dtype]} bytes, the header gives {end - begin}"
            )
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:], strict=False):
        if begin_b < end_a:
            raise WeightsError(f"{path}: tensors {a!r} and {b!r} overlap")
    return header


def _header_length(prefix: bytes, size: int) -> int | None:
    """The header length a safetensors file starts with, or None if ``prefix`` is not one."""
    if len(prefix) < 8:
        return None
    (header_len,) = struct.unpack("<Q", prefix)
    return header_len if 2 <= header_len <= min(size - 8, MAX_HEADER_BYTES) else None


def is_safetensors(path: str | Path) -> bool:
    """Whether ``path`` starts like a safetensors file (whatever its name), read-only sniffing."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        return _header_length(f.read(8), size) is not None and f.read(1) == b"{"


def read_safetensors(path: str | Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Tensors and metadata of a validated safetensors file."""
    check_safetensors(path)
    try:
        return mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # mx.load raises plain RuntimeError/ValueError on bad data
        raise WeightsError(f"{path}: cannot read safetensors ({e})") from None


def _listing(keys: list[str], shapes: dict[str, tuple]) -> str:
    """``key shape`` for the first three keys."""
    more = ", ..." if len(keys) > 3 else ""
    return ", ".join(f"{k} {shapes[k]}" for k in keys[:3]) + more


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Strict check: every parameter is given with its shape (floats for float parameters) and no
    extra tensor is left over."""
    params = tree_flatten(model.parameters())
    expected = {k: tuple(v.shape) for k, v in params}
    floating = {k: mx.issubdtype(v.dtype, mx.floating) for k, v in params}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_listing(missing, expected)}")
    if extra:
        given = {k: tuple(weights[k].shape) for k in extra}
        problems.append(f"{len(extra)} unexpected tensor(s): {_listing(extra, given)}")
    for key in sorted(set(expected) & set(weights)):
        if tuple(weights[key].shape) != expected[key]:
            problems.append(
                f"{key}: checkpoint shape {tuple(weights[key].shape)} != model shape {expected[key]}"
            )
        elif floating[key] and not mx.issubdtype(weights[key].dtype, mx.floating):
            dtype = str(weights[key].dtype).removeprefix("mlx.core.")
            problems.append(
                f"{key}: {dtype} values for a floating-point parameter (quantized or integer "
                "weights are not supported; convert from the float checkpoint)"
            )
    if problems:
        raise WeightsError("weights do not match the model: " + "; ".join(problems[:5]))


def apply_weights(model: nn.Module, weights: dict[str, mx.array], dtype: mx.Dtype | None = None):
    """Sanitize, strictly check and load ``weights`` into ``model`` (floats cast to ``dtype``)."""
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    check_weights(model, weights)
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    return model


def _shards(weights: dict[str, mx.array], max_bytes: int) -> list[dict[str, mx.array]]:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for key in sorted(weights):
        nbytes = weights[key].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = weights[key]
        size += nbytes
    return shards


def check_finite(model: nn.Module, files: Callable[[str], Path | str]) -> None:
    """Refuse NaN or infinite parameters, naming the tensor and ``files(key)``, its file.

    Evaluates the parameters (one pass over the weights).
    """
    params = [
        (k, v) for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)
    ]
    flags = mx.array([mx.all(mx.isfinite(v)) for _, v in params]) if params else mx.array([True])
    mx.eval(model.parameters(), flags)
    bad = [params[i][0] for i in np.flatnonzero(~np.array(flags))]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise WeightsError(
            f"{files(bad[0])}: tensor {bad[0]!r} holds NaN or infinite values{more}; the weights "
            "are damaged"
        )


def save_model(
    model: nn.Module,
    path: str | Path,
    *,
    preprocessing: Preprocessing | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` in mlx-aim's format; the directory appears complete or not at all.

    An existing ``path`` is replaced only with ``overwrite`` (else OutputError).
    """
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        weights = dict(tree_flatten(model.parameters()))
        shards = _shards(weights, max_shard_bytes)
        if len(shards) == 1:
            mx.save_safetensors(str(tmp / WEIGHTS_FILE), shards[0], metadata={"format": "mlx"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
                weight_map.update(dict.fromkeys(shard, name))
            index = {
                "metadata": {
                    "total_size": sum(v.nbytes for v in weights.values()),
                    "total_parameters": sum(v.size for v in weights.values()),
                },
                "weight_map": dict(sorted(weight_map.items())),
            }
            write_json(tmp / INDEX_FILE, index)
        if preprocessing is not None:
            write_json(tmp / PREPROCESS_FILE, preprocessing.to_dict())
        write_json(tmp / CONFIG_FILE, model.args.to_dict())
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The validated ``config.json`` of a model directory; one-line errors name the file."""
    file = Path(path) / CONFIG_FILE
    if not file.exists() and not file.is_symlink():
        raise WeightsError(f"{file}: not found (is {path} an mlx-aim model directory?)")
    config = read_json(file)
    try:
        build_model_args(config)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return config


def read_index(path: str | Path) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard file name) of a sharded model directory.

    Shard names must be plain file names: an index never points outside its folder.
    """
    file = Path(path) / INDEX_FILE
    index = read_json(file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise WeightsError(f"{file}: needs a 'weight_map' object of tensor name -> file name")
    for name in sorted(set(weight_map.values())):
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise WeightsError(
                f"{file}: shard {name!r} is not a file name inside {path}; refusing to read it"
            )
    return weight_map


def weight_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> file for a sharded directory; ``{"": model.safetensors}`` otherwise."""
    path = Path(path)
    if (path / INDEX_FILE).exists() or (path / INDEX_FILE).is_symlink():
        return {k: path / v for k, v in read_index(path).items()}
    return {"": path / WEIGHTS_FILE}


def read_model_weights(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a model directory (single file or shards)."""
    weights: dict[str, mx.array] = {}
    for file in sorted(set(weight_files(path).values())):
        if not file.exists() and not file.is_symlink():
            raise WeightsError(f"{file}: weight file is missing")
        weights.update(read_safetensors(file)[0])
    return weights


def read_preprocessing(path: str | Path, config: dict[str, Any]) -> Preprocessing | None:
    """The validated ``preprocess.json`` of a model directory (None when absent); fields it
    lacks take the defaults of the model's family."""
    file = Path(path) / PREPROCESS_FILE
    if not file.exists() and not file.is_symlink():
        return None
    spec = read_json(file)
    try:
        return Preprocessing.from_dict(spec, default_preprocessing(config))
    except InputError as e:
        raise InputError(f"{file}: {e}") from None


def load_model(path: str | Path, *, dtype: mx.Dtype | None = None) -> nn.Module:
    """Load a model directory written by :func:`save_model`, in eval mode, with its
    ``preprocessing`` (None without ``preprocess.json``). Parameters are evaluated and checked
    to be finite."""
    config = read_config(path)
    preprocessing = read_preprocessing(path, config)
    model = build_model(config)
    try:
        apply_weights(model, read_model_weights(path), dtype)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    files = weight_files(path)
    check_finite(model, lambda key: files.get(key, files.get("", path)))
    model.eval()
    model.preprocessing = preprocessing
    return model
