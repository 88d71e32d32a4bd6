"""Resuming a run: what must not change since the checkpoint, and restoring its state.

A resumed run must keep the settings that fix the data order and the model, the number of
processes and what it trains on, fingerprinted in the checkpoint's ``data.json``: the training
files (paths, sizes and modification times) and, for an ``--objective aimv2`` run, the tar shards
(sizes and modification times), where each image sits in its shard (offset and size), a digest
of each caption and one of the tokenizer. ``--allow-data-change`` accepts a change. The schedule,
the intervals and the other settings may change, and the change is logged. A ``data.json``
written before a section existed is compared on the sections it has.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import InputError
from ..random_key import set_random_key
from .checkpoint import Checkpoint
from .config import TrainConfig

if TYPE_CHECKING:
    from .multimodal import CaptionInputs

DATA_FILE = "data.json"
# The sections of data.json: how many space-separated fields come before the path in an entry.
_SECTIONS = {"files": 2, "shards": 2, "members": 1, "captions": 1, "tokenizer": 1}
# Settings a resumed run must share with the run that wrote the checkpoint (data order, model,
# batch composition, objective). A checkpoint older than a setting was written with its default.
FIXED_ON_RESUME = (
    "data", "val_data", "val_fraction", "model", "head_blocks", "head_width", "batch_size",
    "grad_accum", "seed", "objective", "vocab_size", "tokenizer", "target", "attention",
    "patch_order", "min_crop_scale",
)  # fmt: skip
# Settings that say where and how to run, not what: never reported as changed.
_NOT_SETTINGS = ("resume", "output", "allow_data_change", "quiet")


def data_listing(paths: Sequence[Path], captions: CaptionInputs | None = None) -> dict[str, Any]:
    """The fingerprint of what a run trains on (see the module docstring), one short line per
    file, image or caption, so that the copy in every checkpoint stays small.

    ``files``: ``"SIZE MTIME_NS PATH"`` of each of ``paths``, sorted by path; with ``captions``
    also ``shards`` (same form), ``members`` (``"OFFSET:SIZE PATH"``), ``captions``
    (``"DIGEST PATH"``) and ``tokenizer`` (``"DIGEST tokenizer.json"``).
    """
    listing: dict[str, Any] = {"files": _stat_lines(paths)}
    if captions is not None:
        members = captions.members
        listing["shards"] = _stat_lines({shard for shard, _, _ in members.values()})
        listing["members"] = sorted(f"{at}:{size} {p}" for p, (_, at, size) in members.items())
        listing["captions"] = sorted(f"{_digest(c)} {p}" for p, c in captions.captions.items())
        listing["tokenizer"] = [f"{captions.tokenizer.fingerprint} tokenizer.json"]
    return listing


def _stat_lines(paths) -> list[str]:
    lines = []
    for path in sorted(set(map(str, paths))):
        try:
            info = os.stat(path)
            lines.append(f"{info.st_size} {info.st_mtime_ns} {path}")
        except OSError:
            lines.append(f"-1 -1 {path}")  # gone since it was listed, or a tar member
    return lines


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_changes(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """What changed between two listings ("3 added, 1 removed, 2 modified"), or "".

    Only the sections ``saved`` has are compared; an entry counts once, whatever changed in it.
    """
    sections = [s for s in _SECTIONS if s in saved]
    before, after = _by_path(saved, sections), _by_path(current, sections)
    counts = (
        (len(after.keys() - before.keys()), "added"),
        (len(before.keys() - after.keys()), "removed"),
        (sum(before[p] != after[p] for p in before.keys() & after.keys()), "modified"),
    )
    return ", ".join(f"{n} {what}" for n, what in counts if n)


def _by_path(listing: dict[str, Any], sections: list[str]) -> dict[str, tuple[str, ...]]:
    """``{path: (what each section says of it)}`` (entries of another shape are left out)."""
    found: dict[str, dict[str, str]] = {}
    for section in sections:
        entries = listing.get(section)
        for entry in entries if isinstance(entries, list) else []:
            parts = entry.split(" ", _SECTIONS[section]) if isinstance(entry, str) else []
            if len(parts) == _SECTIONS[section] + 1:
                found.setdefault(parts[-1], {})[section] = " ".join(parts[:-1])
    return {path: tuple(values.get(s, "") for s in sections) for path, values in found.items()}


def check_resumable(
    checkpoint: Checkpoint,
    config: TrainConfig,
    model_config: dict[str, Any],
    world_size: int,
    listing: dict[str, Any],
) -> list[str]:
    """Refuse a checkpoint this run cannot continue (``InputError``); the settings that changed."""
    saved = checkpoint.state["config"]
    # a setting the checkpoint predates: the default it ran with (some depend on these two)
    defaults = TrainConfig(**{k: saved[k] for k in ("objective", "data") if k in saved}).to_dict()
    output = config.output_dir
    for name in FIXED_ON_RESUME:
        value = saved.get(name, defaults[name])
        if value != getattr(config, name):
            raise InputError(
                f"{output} holds a run with --{_flag(name)} {value!r}, this command "
                f"has {getattr(config, name)!r}; a resumed run keeps it (use another --output to "
                "start a new run)"
            )
    if checkpoint.state["model_config"] != model_config:
        raise InputError(f"{output} holds a run of a different model than --model {config.model}")
    if checkpoint.state["world_size"] != world_size:
        raise InputError(
            f"{output} was written by {checkpoint.state['world_size']} processes; resume it with "
            f"the same number (this run has {world_size})"
        )
    saved_listing = checkpoint.documents.get(DATA_FILE)
    changes = data_changes(saved_listing, listing) if saved_listing is not None else ""
    if changes and not config.allow_data_change:
        raise InputError(
            f"the training files changed since {checkpoint.path} ({changes}); resuming would "
            "not repeat the interrupted run (--allow-data-change continues anyway)"
        )
    changed = [
        f"--{_flag(k)} {saved[k]!r} -> {v!r}"
        for k, v in config.to_dict().items()
        if k in saved and saved[k] != v and k not in _NOT_SETTINGS
    ]
    if changes:
        changed.append(f"training files ({changes})")
    return changed


def restore(checkpoint: Checkpoint, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Load the checkpoint's weights, optimizer state and random state (``InputError`` if unfit)."""
    try:
        weights = checkpoint.arrays["model.safetensors"]
        model.load_weights(list(weights.items()), strict=True)
        current = dict(tree_flatten(optimizer.state))
        state = checkpoint.arrays["optimizer.safetensors"]
        if set(state) != set(current) or any(state[k].shape != current[k].shape for k in state):
            raise ValueError("the optimizer state does not match the model")
        optimizer.state = tree_unflatten(list(state.items()))
        optimizer.init(model.trainable_parameters())
        set_random_key(checkpoint.state["random_state"])
    except (KeyError, ValueError) as e:
        raise InputError(f"{checkpoint.path}: cannot restore this checkpoint ({e})") from None


def _flag(name: str) -> str:
    return name.replace("_", "-")
