"""mlx-aim's weight format: a directory with ``config.json`` and ``model.safetensors`` (or shards).

Layout (as mlx-lm): ``config.json`` (sorted keys, with ``model_type``), ``model.safetensors`` or
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json`` above
``MAX_SHARD_BYTES``, and ``preprocess.json`` (how to prepare images). Keys follow apple/ml-aim.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import InputError
from .models import build_model, build_model_args
from .models.base import ConfigError
from .registry import Preprocessing

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PREPROCESS_FILE = "preprocess.json"
MAX_SHARD_BYTES = 5 * 2**30

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class WeightsError(InputError):
    """Weights that do not fit a model or a file that is not valid; the message names the cause."""


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """Validate a safetensors header against the file before any tensor is read.

    Refuses unknown dtypes, shapes that disagree with their byte ranges, and offsets that overlap or
    run past the end of the file. Returns the parsed header.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, 100 * 2**20):
            raise WeightsError(f"{path}: not a safetensors file (header length {header_len})")
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


def read_safetensors(path: str | Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Tensors and metadata of a validated safetensors file."""
    check_safetensors(path)
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # mx.load raises plain RuntimeError/ValueError on bad data
        raise WeightsError(f"{path}: cannot read safetensors ({e})") from None


def _listing(keys: list[str], shapes: dict[str, tuple]) -> str:
    """``key shape`` for the first three keys."""
    more = ", ..." if len(keys) > 3 else ""
    return ", ".join(f"{k} {shapes[k]}" for k in keys[:3]) + more


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Strict check: every parameter is given with its shape and no extra tensor is left over."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    _atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=True) + "\n")


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


def replace_directory(new: Path, target: Path) -> None:
    """Move the complete directory ``new`` to ``target``, replacing an existing ``target``."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def save_model(
    model: nn.Module,
    path: str | Path,
    *,
    preprocessing: Preprocessing | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` in mlx-aim's format; the directory appears complete or not at all."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists (pass overwrite=True / --force to replace it)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
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
        replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory, with a clear error when unreadable."""
    file = Path(path) / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{file}: not found (is {path} an mlx-aim model directory?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{file}: invalid JSON ({e})") from None
    try:
        build_model_args(config)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return config


def read_model_weights(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a model directory (single file or shards)."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = [WEIGHTS_FILE]
    weights: dict[str, mx.array] = {}
    for name in files:
        if not (path / name).exists():
            raise WeightsError(f"{path / name}: weight file is missing")
        weights.update(read_safetensors(path / name)[0])
    return weights


def read_preprocessing(path: str | Path) -> Preprocessing | None:
    file = Path(path) / PREPROCESS_FILE
    return Preprocessing.from_dict(json.loads(file.read_text())) if file.exists() else None


def load_model(path: str | Path, *, dtype: mx.Dtype | None = None, lazy: bool = False) -> nn.Module:
    """Load a model directory written by :func:`save_model`; set to eval mode."""
    config = read_config(path)
    model = build_model(config)
    try:
        apply_weights(model, read_model_weights(path), dtype)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    model.eval()
    model.preprocessing = read_preprocessing(path)
    if not lazy:
        mx.eval(model.parameters())
    return model
