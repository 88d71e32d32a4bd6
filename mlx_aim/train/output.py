"""The output directory of a run: checked before training (preflight) and locked while it runs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from .. import io
from ..errors import OutputError

LOCK_FILE = "train.lock"
_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")  # an exported model's weight shards
_WRITE_TEST = ".write-test"


class OutputLock:
    """An exclusive lock on an output directory for the life of the run.

    The lock is an ``flock`` on the directory itself, so deleting ``train.lock`` does not let a
    second run in, and the kernel releases it when the process dies, even by ``kill -9``.
    ``train.lock`` only records the holder (pid and host) for the messages; one left by a run that
    is gone is recovered and named (``recovered``). It is emptied, not deleted, on release.
    """

    def __init__(self, output: Path):
        self.output = output
        self.path = output / LOCK_FILE
        self.recovered = ""  # the holder of a stale lock taken over, e.g. "pid 12 on host"
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock, or raise ``OutputError`` naming the run that holds it."""
        try:
            fd = os.open(self.output, os.O_RDONLY)
        except OSError as e:
            raise OutputError(f"cannot open {self.output}: {io.os_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = _read_holder(self.path) or f"its {LOCK_FILE} was removed"
            raise OutputError(
                f"{self.output} is in use by another training run ({holder}); wait for it to "
                "finish or choose another --output"
            ) from None
        self._fd = fd
        try:
            self.recovered = _read_holder(self.path)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            io.write_text(self.path, json.dumps(info) + "\n")
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                io.write_text(self.path, "")  # an empty lock file marks a clean exit
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_leftovers(folder: Path) -> None:
    """Delete the temporary files and folders of writes cut off by a crash (``io.is_temporary``).

    Only while holding the lock: a running run's temporary files look the same.
    """
    if folder.is_dir():
        for path in folder.iterdir():
            if not io.is_temporary(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _read_holder(path: Path) -> str:
    try:
        info = json.loads(io.read_text(path, max_bytes=4096) or "null")
        return f"pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _is_own_leftover(name: str, own_names: frozenset[str]) -> bool:
    """A temporary file of an atomic write (or a write probe) cut off by a crash."""
    return io.is_temporary(name) and any(
        name.lstrip(".").startswith(own) for own in (*own_names, _WRITE_TEST[1:])
    )


def preflight(
    output: Path, needed_bytes: int, own_names: frozenset[str] = frozenset(), reusable: int = 0
) -> None:
    """Check that ``output`` can be created, written and has room for ``needed_bytes``.

    ``reusable`` is what the run already holds there and will replace (its checkpoints and
    exported trunk), credited to the free space. An existing directory must be empty or hold only
    ``own_names`` (what a run writes), so that a run never writes into, say, a converted model's
    folder. Raises ``OutputError`` with the reason before any training starts; a directory it
    created is removed again.
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
    free = shutil.disk_usage(io.nearest_existing(output)).free
    if free + reusable < needed_bytes:
        raise OutputError(
            f"the output directory {output} has {_mib(free)} free"
            + (f" (+ {_mib(reusable)} its run will replace)" if reusable else "")
            + f"; this run needs about {_mib(needed_bytes)} for its checkpoints and the exported "
            "model (free some space, lower --keep-checkpoints or choose another --output)"
        )
    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot create the output directory {output}: {io.os_reason(e)}"
        ) from None
    try:
        _write_probe(output)
    except OSError as e:
        if created:
            with contextlib.suppress(OSError):
                output.rmdir()
        raise OutputError(
            f"the output directory {output} is not writable: {io.os_reason(e)}"
        ) from None


def _write_probe(output: Path) -> None:
    probe = output / f"{_WRITE_TEST}.{os.getpid()}{io.TEMP_SUFFIX}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
