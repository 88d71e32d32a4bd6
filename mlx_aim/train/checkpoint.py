"""Training checkpoints: atomic, integrity-checked, pruned; the output-directory lock and preflight.

A checkpoint is a folder ``checkpoints/step-00000100/`` holding ``model.safetensors`` (the
pre-training model's float32 weights), ``optimizer.safetensors`` (the AdamW state), ``state.json``
(step, random state, data-loader positions, run config) and ``checkpoint.json``: the size and
sha256 of each other file. It is written into a hidden temporary folder which is renamed into
place only once complete, so a crash (even ``kill -9``) leaves either the whole checkpoint or
none. Loading verifies ``checkpoint.json``; a damaged checkpoint is named and the previous one
is used.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..weights import replace_directory
from .errors import BadInputError, OutputError

CHECKPOINTS = "checkpoints"
INTEGRITY_FILE = "checkpoint.json"
STATE_FILE = "state.json"
LOCK_FILE = "train.lock"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})$")
_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")  # an exported model's weight shards
# Test-only fault injection: "kill-in-checkpoint:STEP" sends SIGKILL to this process after the
# first file of the checkpoint of STEP is written (before the rename); "kill-after-checkpoint:STEP"
# and "sigint-after-checkpoint:STEP" send SIGKILL or SIGINT once that checkpoint is complete.
FAULT_ENV = "MLX_AIM_TRAIN_FAULT"
_FAULT_SIGNALS = {"kill": signal.SIGKILL, "sigint": signal.SIGINT}

Log = Callable[[str], None]


@dataclass
class Checkpoint:
    """A verified checkpoint read back from disk."""

    path: Path
    step: int
    arrays: dict[str, dict[str, mx.array]]
    state: dict[str, Any]


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fault(where: str, step: int) -> None:
    for name, signum in _FAULT_SIGNALS.items():
        if os.environ.get(FAULT_ENV) == f"{name}-{where}-checkpoint:{step}":
            os.kill(os.getpid(), signum)


def save_checkpoint(
    output: Path,
    step: int,
    arrays: dict[str, dict[str, mx.array]],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of ``step`` atomically and keep only the last ``keep``.

    ``arrays`` maps a file name (``model.safetensors``) to its tensors. Raises ``OutputError``
    when the write fails (disk full, permissions); the earlier checkpoints are left intact.
    """
    root = output / CHECKPOINTS
    final = checkpoint_dir(output, step)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
        tmp.chmod(0o755)  # mkdtemp makes it private
        for name, tensors in arrays.items():
            mx.save_safetensors(str(tmp / name), tensors, metadata={"format": "mlx"})
            _fsync(tmp / name)
            _fault("in", step)
        _write_json(tmp / STATE_FILE, {**state, "step": step})
        files = sorted(p.name for p in tmp.iterdir())
        integrity = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": {
                n: {"size": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in files
            },
        }
        _write_json(tmp / INTEGRITY_FILE, integrity)
        _fsync(tmp)
        replace_directory(tmp, final)  # the same step written again (a resumed run) is replaced
        tmp = None
        _fsync(root)
    except OSError as e:
        raise OutputError(
            f"cannot write the checkpoint of step {step} to {final}: {_os_reason(e)}; "
            "the earlier checkpoints are intact"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    prune_checkpoints(output, keep)
    _fault("after", step)
    return final


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only or not writable)"
    return e.strerror or str(e)


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint folders, newest first (not verified)."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def prune_checkpoints(output: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and leftovers of interrupted writes."""
    for _, path in list_checkpoints(output)[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    root = output / CHECKPOINTS
    for leftover in root.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against ``checkpoint.json``; return the parsed state or raise ValueError."""
    try:
        integrity = json.loads((path / INTEGRITY_FILE).read_text())
        files = integrity["files"]
    except FileNotFoundError:
        raise ValueError(f"{INTEGRITY_FILE} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{INTEGRITY_FILE} is unreadable ({e.__class__.__name__})") from None
    if integrity.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unknown checkpoint format {integrity.get('format_version')!r}")
    for name, info in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise ValueError(f"{name} is missing")
        size = file.stat().st_size
        if size != info["size"]:
            raise ValueError(f"{name} has {size} bytes, expected {info['size']} (truncated?)")
        if _sha256(file) != info["sha256"]:
            raise ValueError(f"{name} does not match its sha256 (corrupted)")
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{STATE_FILE} is unreadable ({e.__class__.__name__})") from None


def load_latest_checkpoint(output: Path, log: Log) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged ones are named in the log and skipped.

    Returns None when there is no checkpoint; raises ``BadInputError`` when every one is damaged.
    """
    found = list_checkpoints(output)
    for step, path in found:
        try:
            state = verify_checkpoint(path)
            arrays = {}
            for name in sorted(p.name for p in path.glob("*.safetensors")):
                arrays[name] = mx.load(str(path / name))
        except (ValueError, RuntimeError, OSError) as e:
            log(f"checkpoint {path} is damaged ({e}); trying the previous one")
            continue
        return Checkpoint(path, step, arrays, state)
    if found:
        raise BadInputError(
            f"no usable checkpoint in {output / CHECKPOINTS} (all {len(found)} are damaged); "
            "delete that folder to start the run again"
        )
    return None


# ---- output directory ------------------------------------------------------------------------


class OutputLock:
    """An exclusive lock on an output directory: ``train.lock`` with this run's pid and host.

    The lock is an ``flock`` held for the life of the process, so the kernel releases it when the
    process dies, even by ``kill -9``; a lock file left behind by a crashed run is therefore
    recovered (and named in the log) rather than blocking the next run. The file is emptied, not
    deleted, on release (deleting it would let two later runs lock two different files).
    """

    def __init__(self, output: Path):
        self.path = output / LOCK_FILE
        self.recovered = ""  # the owner of a stale lock taken over, e.g. "pid 12 on host"
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {self.path}: {_os_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _read_owner(fd)
            os.close(fd)
            raise OutputError(
                f"{self.path.parent} is in use by another training run ({owner}); wait for it "
                "to finish or choose another --output"
            ) from None
        self.recovered = _read_owner(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file marks a clean exit
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _is_own_leftover(name: str, own_names: frozenset[str]) -> bool:
    """A temporary file of an atomic write (or a write probe) cut off by a crash."""
    if name.startswith(".write-test-"):
        return True
    return (
        name.startswith(".")
        and name.endswith(".tmp")
        and any(name[1:].startswith(own) for own in own_names)
    )


def preflight(output: Path, needed_bytes: int, own_names: frozenset[str] = frozenset()) -> None:
    """Check that ``output`` can be created, written and has room for ``needed_bytes``.

    An existing directory must be empty or hold only ``own_names`` (what a run writes), so that a
    run never writes into, say, a converted model's folder. Raises ``OutputError`` with the reason
    before any training starts.
    """
    if output.is_dir():
        foreign = sorted(
            p.name
            for p in output.iterdir()
            if p.name not in own_names
            and not _SHARD.match(p.name)
            and not _is_own_leftover(p.name, own_names)
        )
        if foreign:
            raise OutputError(
                f"{output} already holds other files ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty --output"
            )
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output directory {output}: {_os_reason(e)}") from None
    probe = output / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        probe.unlink(missing_ok=True)
        raise OutputError(
            f"the output directory {output} is not writable: {_os_reason(e)}"
        ) from None
    free = shutil.disk_usage(output).free
    if free < needed_bytes:
        raise OutputError(
            f"the output directory {output} has {_mb(free)} free; this run needs about "
            f"{_mb(needed_bytes)} for its checkpoints and the exported model (free some space, "
            "lower --keep-checkpoints or choose another --output)"
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
