"""Reading and writing files safely: the one place mlx-aim touches the disk for its outputs.

Writing: every output appears complete or not at all. A file is written to a hidden temporary
sibling (``.NAME.XXXX.tmp``), flushed to disk and renamed over its destination; a directory is
built in a hidden staging sibling and swapped in. Files get the usual mode for the user's umask.
Failures (disk full, read-only file system, permission denied) become one
:class:`~mlx_aim.errors.OutputError` naming the path, and no temporary file is left behind.

Reading: only regular files are opened (a FIFO, a device or ``/dev/zero`` reached through a link or
a glob is refused, never read), and sizes can be checked before anything is read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import InputError, OutputError

TEMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a parent is not a directory",
    errno.EISDIR: "is a directory",
    errno.ENAMETOOLONG: "name too long",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "already exists",
}


def os_reason(error: BaseException) -> str:
    """A short human reason for an OS-level failure ("read-only file system", ...)."""
    if isinstance(error, OSError) and error.errno in _REASONS:
        return _REASONS[error.errno]
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    text = str(error).strip() or type(error).__name__
    return text[0].lower() + text[1:]


def output_error(path: str | Path, error: BaseException) -> OutputError:
    """The one-line :class:`OutputError` for a failed write of ``path``.

    MLX's writers raise ``RuntimeError`` rather than ``OSError`` on a full disk; the free space left
    tells the two apart.
    """
    if isinstance(error, OutputError):
        return error
    reason = os_reason(error)
    if not isinstance(error, OSError) and _free_bytes(Path(path)) < 1 << 20:
        reason = "no space left on the device"
    return OutputError(f"cannot write {path}: {reason}")


def _free_bytes(path: Path) -> int:
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free
    return 1 << 62


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn any failure to write ``path`` inside the block into one :class:`OutputError`."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, OutputError) or not (isinstance(e, OSError) or _is_write_failure(e)):
            raise
        raise output_error(path, e) from None


def _is_write_failure(error: RuntimeError) -> bool:
    text = str(error).lower()
    return any(w in text for w in ("write", "open", "space", "file", "save"))


def file_mode(directory: bool = False) -> int:
    """The mode a new file (or directory) gets under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_destination(
    path: str | Path,
    *,
    overwrite: bool = False,
    directory: bool = False,
    reads: Iterable[str | Path] = (),
) -> Path:
    """Refuse an output that cannot be written, before any work is done; creates nothing.

    An existing destination needs ``overwrite`` (``--force``) and must be of the right kind; the
    closest existing folder on the way must be a writable directory; and it must not overlap what
    the command ``reads`` (see :func:`check_not_reading`), ``--force`` or not.
    """
    path = Path(path).expanduser()
    check_not_reading(path, reads)
    if path.exists() or path.is_symlink():
        if directory != path.is_dir():
            kind = "a directory" if path.is_dir() else "a file"
            raise OutputError(f"{path} is {kind}; refusing to replace it with the output")
        if not overwrite:
            raise OutputError(f"{path} already exists (use --force to replace it)")
    folder = nearest_existing(path.parent)
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(folder) else "permission denied"
        raise OutputError(f"cannot write {path}: {reason} ({folder})")
    return path


def check_not_reading(path: str | Path, reads: Iterable[str | Path]) -> None:
    """Refuse to write ``path`` over (or inside, or around) a model, run or file being read.

    ``reads`` are the inputs of the command (a model folder, a run, a checkpoint file); names that
    are not paths on disk (registry names) are ignored. OutputError when ``path`` is one of them,
    lies inside one of the folders, or is a folder holding one of them.
    """
    target = Path(os.path.abspath(Path(path).expanduser())).resolve()
    for source in reads:
        read = Path(source).expanduser()
        if not read.exists():
            continue
        read = read.resolve()
        inside = read.is_dir() and target.is_relative_to(read)
        if target == read or inside or read.is_relative_to(target):
            raise OutputError(
                f"{path}: refusing to write into {source}, which this command reads; write the "
                "output elsewhere"
            )


def _read_only(folder: Path) -> bool:
    with contextlib.suppress(OSError):
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    return False


def _make_parent(path: Path) -> None:
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)


def temporary_sibling(path: Path, directory: bool = False) -> Path:
    """A new hidden temporary file (or directory) next to ``path`` (same file system)."""
    _make_parent(path)
    with writing(path):
        if directory:
            tmp = Path(
                tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
            )
            os.chmod(tmp, file_mode(directory=True))
            return tmp
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.close(fd)
        os.chmod(name, file_mode())
        return Path(name)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a leftover of an interrupted write (safe to delete)."""
    return name.startswith(".") and (name.endswith(TEMP_SUFFIX) or name.endswith(OLD_SUFFIX))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """Yield temporary paths to write ``paths`` through; on success all are renamed into place.

    For writers that take a file name (``mx.save_safetensors``, ``np.save``, PIL) and for paired
    outputs (``emb.npy`` + ``emb.paths.txt``): the files are renamed in the order given, so put
    the one readers look for first last. On any failure every temporary file is removed and no
    destination is touched.
    """
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for target in targets:
            temps.append(temporary_sibling(target))
        with writing(targets[0]):
            yield temps
        for tmp, target in zip(temps, targets, strict=True):
            with writing(target):
                _fsync(tmp)
                os.replace(tmp, target)
    finally:
        for tmp in temps:
            if tmp.exists():
                _remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file to write ``path``; it replaces ``path`` when the block succeeds."""
    with atomic_paths(path) as (tmp,):
        with open(tmp, mode) as f:
            yield f
            f.flush()


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def replace_directory(new: Path, target: Path) -> None:
    """Move the complete directory ``new`` to ``target``, replacing an existing ``target``.

    The old one is first moved aside to ``.NAME.old`` and deleted once the new one is in place, so
    a crash in between leaves a complete directory under one of the two names.
    """
    with writing(target):
        if target.exists():
            old = target.with_name(f".{target.name}{OLD_SUFFIX}")
            _remove(old)
            os.replace(target, old)
            os.replace(new, target)
            _remove(old)
        else:
            os.replace(new, target)


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that replaces ``path`` as a whole when the block succeeds."""
    path = check_destination(path, overwrite=overwrite, directory=True)
    staging = temporary_sibling(path, directory=True)
    try:
        with writing(path):
            yield staging
        replace_directory(staging, path)
    finally:
        _remove(staging)


class FileRefused(InputError):
    """A file that is not read: missing, not a regular file or too large; ``reason`` says why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _check_info(path: str | Path, info: os.stat_result, max_bytes: int | None) -> int:
    if not stat.S_ISREG(info.st_mode):
        raise FileRefused(path, f"not a regular file ({_file_kind(info.st_mode)})")
    if max_bytes is not None and info.st_size > max_bytes:
        raise FileRefused(
            path, f"too large: {_mib(info.st_size)}, above the {_mib(max_bytes)} limit"
        )
    return info.st_size


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def check_regular_file(path: str | Path, max_bytes: int | None = None) -> int:
    """The size of ``path`` if it is a regular file of at most ``max_bytes``; else FileRefused.

    Follows links, so a link to a FIFO, a device or ``/dev/zero`` is refused without opening it.
    """
    try:
        info = os.stat(path)
    except OSError as e:
        raise FileRefused(path, os_reason(e)) from None
    return _check_info(path, info, max_bytes)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return name
    return "not a plain file"


def open_regular(path: str | Path, max_bytes: int | None = None) -> IO[bytes]:
    """Open a regular file for binary reading; refuses anything else without blocking on it.

    The checks run on the opened descriptor, so a file swapped for a FIFO after a check is
    still refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise FileRefused(path, os_reason(e)) from None
    try:
        _check_info(path, os.fstat(fd), max_bytes)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path: str | Path, max_bytes: int = 64 * 2**20) -> str:
    """The UTF-8 text of a regular file (size-checked); InputError naming the file otherwise."""
    with open_regular(path, max_bytes) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | Path, max_bytes: int = 64 * 2**20) -> Any:
    """Parsed JSON of a regular file; InputError naming the file and the position otherwise."""
    try:
        return json.loads(read_text(path, max_bytes))
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise InputError(f"{path}: invalid JSON (nested too deeply)") from None
