"""Training checkpoints: atomic, integrity-checked, pruned by what verifies.

A checkpoint is a folder ``checkpoints/step-00000100/`` holding ``model.safetensors`` (the
pre-training model's float32 weights), ``optimizer.safetensors`` (the AdamW state), ``state.json``
(step, random state, data-loader positions, run config), optionally ``data.json`` (the training
file list it was trained on) and ``checkpoint.json``: the size and sha256 of each other file. It
is built in a hidden staging folder and renamed into place only once complete (``mlx_aim.io``), so
a crash (even ``kill -9``) leaves either the whole checkpoint or none.

Loading verifies ``checkpoint.json`` and the shape of ``state.json``; a damaged checkpoint is named
and the previous one used. Pruning keeps the newest ``keep`` checkpoints that verify and deletes
damaged ones, so it never removes the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from .. import io
from ..errors import InputError, OutputError
from .output import remove_leftovers

CHECKPOINTS = "checkpoints"
INTEGRITY_FILE = "checkpoint.json"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# What state.json must hold, with the JSON type of each entry.
_STATE_FIELDS = {
    "config": dict,
    "model_config": dict,
    "world_size": int,
    "random_state": list,
    "loaders": list,
}
# Test-only fault injection: "kill-in-checkpoint:STEP" sends SIGKILL to this process after the
# first file of the checkpoint of STEP is written (before the rename);
# "SIGNAL-after-checkpoint:STEP" (kill, sigint, sigterm, sighup) sends that signal once the
# checkpoint is complete.
FAULT_ENV = "MLX_AIM_TRAIN_FAULT"
_FAULT_SIGNALS = {
    "kill": signal.SIGKILL,
    "sigint": signal.SIGINT,
    "sigterm": signal.SIGTERM,
    "sighup": signal.SIGHUP,
}

Log = Callable[[str], None]


@dataclass
class Checkpoint:
    """A verified checkpoint read back from disk; ``documents`` are its JSON files by name."""

    path: Path
    step: int
    arrays: dict[str, dict[str, mx.array]]
    documents: dict[str, Any]

    @property
    def state(self) -> dict[str, Any]:
        return self.documents[STATE_FILE]


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint folders, newest first (not verified)."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def checkpoint_bytes(output: Path) -> int:
    """Bytes held by the checkpoint folders of ``output`` (a resumed run replaces them)."""
    return sum(
        f.stat().st_size
        for _, path in list_checkpoints(output)
        for f in path.iterdir()
        if f.is_file()
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with io.open_regular(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault(where: str, step: int) -> None:
    for name, signum in _FAULT_SIGNALS.items():
        if os.environ.get(FAULT_ENV) == f"{name}-{where}-checkpoint:{step}":
            os.kill(os.getpid(), signum)


class CheckpointStore:
    """The checkpoints of one output directory: write, load the newest intact one, prune.

    A checkpoint is verified (every file hashed) at most once per run: those written or loaded
    by this run are known to be intact.
    """

    def __init__(self, output: Path, keep: int, log: Log):
        self.output = output
        self.keep = keep
        self.log = log
        self._intact: set[Path] = set()

    def save(
        self, step: int, arrays: dict[str, dict[str, mx.array]], documents: dict[str, Any]
    ) -> Path:
        """Write the checkpoint of ``step`` atomically, then prune.

        ``arrays`` maps a file name (``model.safetensors``) to its tensors, ``documents`` a file
        name (``state.json``) to its JSON. Raises ``OutputError`` when the write fails (disk
        full, permissions); the earlier checkpoints are left intact.
        """
        final = checkpoint_dir(self.output, step)
        try:
            with io.writing(final):
                staging = io.temporary_sibling(final, directory=True)
                try:
                    _write_checkpoint(staging, step, arrays, documents)
                    io.replace_directory(staging, final)  # a step written again is replaced
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
                _fsync(final.parent)
        except OutputError as e:
            raise OutputError(f"{e}; the earlier checkpoints are intact") from None
        self._intact.add(final)
        self.prune()
        _fault("after", step)
        return final

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; damaged ones are named and skipped.

        Returns None when there is no checkpoint; raises ``InputError`` when every one is damaged.
        """
        found = list_checkpoints(self.output)
        for step, path in found:
            try:
                documents = verify_checkpoint(path)
                arrays = {
                    name: mx.load(str(path / name))
                    for name in sorted(p.name for p in path.glob("*.safetensors"))
                }
            except (ValueError, RuntimeError, OSError) as e:
                self.log(f"checkpoint {path} is damaged ({e}); trying the previous one")
                continue
            self._intact.add(path)
            return Checkpoint(path, step, arrays, documents)
        if found:
            raise InputError(
                f"no usable checkpoint in {self.output / CHECKPOINTS} (all {len(found)} are "
                "damaged); delete that folder to start the run again"
            )
        return None

    def prune(self) -> None:
        """Keep the newest ``keep`` intact checkpoints; delete the others and write leftovers."""
        kept = 0
        for _, path in list_checkpoints(self.output):
            if kept < self.keep:
                problem = self._problem(path)
                if problem is None:
                    kept += 1
                    continue
                self.log(f"removing the damaged checkpoint {path} ({problem})")
            shutil.rmtree(path, ignore_errors=True)
        remove_leftovers(self.output / CHECKPOINTS)

    def newest_intact(self) -> Path | None:
        """The newest checkpoint that verifies, if any."""
        for _, path in list_checkpoints(self.output):
            if self._problem(path) is None:
                return path
        return None

    def _problem(self, path: Path) -> str | None:
        if path in self._intact:
            return None
        try:
            verify_checkpoint(path)
        except ValueError as e:
            return str(e)
        self._intact.add(path)
        return None


def _write_checkpoint(
    folder: Path, step: int, arrays: dict[str, dict[str, mx.array]], documents: dict[str, Any]
) -> None:
    for name, tensors in arrays.items():
        mx.save_safetensors(str(folder / name), tensors, metadata={"format": "mlx"})
        _fsync(folder / name)
        _fault("in", step)
    for name, document in documents.items():
        io.write_json(folder / name, {**document, "step": step} if name == STATE_FILE else document)
    integrity = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "files": {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir())
        },
    }
    io.write_json(folder / INTEGRITY_FILE, integrity)
    _fsync(folder)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against ``checkpoint.json``; its JSON files by name, or ValueError."""
    files = _integrity_files(path)
    for name, info in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise ValueError(f"{name} is missing")
        size = file.stat().st_size
        if size != info["size"]:
            raise ValueError(f"{name} has {size} bytes, expected {info['size']} (truncated?)")
        if _sha256(file) != info["sha256"]:
            raise ValueError(f"{name} does not match its sha256 (corrupted)")
    if STATE_FILE not in files:
        raise ValueError(f"{INTEGRITY_FILE} does not list {STATE_FILE}")
    documents = {name: _read_document(path / name) for name in files if name.endswith(".json")}
    _check_state(documents[STATE_FILE])
    return documents


def _integrity_files(path: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` table of ``checkpoint.json``, checked entry by entry."""
    integrity = _read_document(path / INTEGRITY_FILE)
    if integrity.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unknown checkpoint format {integrity.get('format_version')!r}")
    files = integrity.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{INTEGRITY_FILE}: 'files' must be an object of name -> size and sha256")
    for name, info in files.items():
        if not _FILE_NAME.match(name) or name.startswith("."):
            raise ValueError(f"{INTEGRITY_FILE}: {name!r} is not a file name of this folder")
        if not (
            isinstance(info, dict)
            and isinstance(info.get("size"), int)
            and isinstance(info.get("sha256"), str)
        ):
            raise ValueError(f"{INTEGRITY_FILE}: the entry of {name} needs a size and a sha256")
    return files


def _read_document(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path.name} is missing")
    try:
        value = io.read_json(path)
    except InputError as e:
        raise ValueError(str(e).removeprefix(f"{path}: ")) from None
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} must hold a JSON object")
    return value


def _check_state(state: dict[str, Any]) -> None:
    for key, kind in _STATE_FIELDS.items():
        if key not in state:
            raise ValueError(f"{STATE_FILE} has no {key!r}")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise ValueError(f"{STATE_FILE}: {key!r} must be a JSON {kind.__name__}")
    positions = state["loaders"]
    if len(positions) != state["world_size"] or not all(
        _ints(p, 2) and min(p) >= 0 for p in positions
    ):
        raise ValueError(f"{STATE_FILE}: 'loaders' must hold an [epoch, cursor] per process")
    if not isinstance(state.get("loop", {}), dict):
        raise ValueError(f"{STATE_FILE}: 'loop' must be a JSON object")
    skipped = state.get("skipped_files", [])
    if not (isinstance(skipped, list) and all(isinstance(p, str) for p in skipped)):
        raise ValueError(f"{STATE_FILE}: 'skipped_files' must be a list of paths")
    key = state["random_state"]
    if not (_ints(key, 2) and 0 <= min(key) and max(key) < 2**32):
        raise ValueError(f"{STATE_FILE}: 'random_state' must be two unsigned integers")


def _ints(value: Any, n: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
