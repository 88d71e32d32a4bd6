"""Robust image decoding and image-file discovery (numpy + Pillow only, thread-safe).

``open_image`` turns any readable image file into a fully decoded 8-bit RGB ``PIL.Image``, or
raises ``ImageError`` with a one-line human reason. ``find_images`` expands files, folders, glob
patterns and ``.txt`` path lists into a deterministic list of image paths without decoding them.

Pillow's warnings (decompression-bomb, corrupt EXIF, odd palettes, ...) never reach the user:
``open_image`` keeps an "ignore warnings raised inside PIL" filter at the front of the process's
warning filters (``warnings.catch_warnings`` is not thread-safe, and worker threads decode).
Images above Pillow's decompression-bomb limit are rejected explicitly instead. The ``PIL``
logger gets a ``NullHandler``, so its error records (e.g. for corrupt TIFFs) are not printed
unless the application configures logging.
"""

from __future__ import annotations

import errno
import glob
import io
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError
from ..io import FileRefused, check_regular_file, open_regular, read_text
from ..messages import printable

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
MIN_SIDE = 1  # 1x1 images are accepted: the transforms handle them (a flat colour patch).
# No image under Pillow's decompression-bomb limit is larger: 89.5 Mpx at 8 bytes a pixel
# (16-bit RGBA, uncompressed) is 716 MB. Larger files are refused before a byte is read.
MAX_IMAGE_BYTES = 2**30
MAX_LIST_BYTES = 256 * 2**20  # a .txt path list (a million long paths)
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as browsers show them
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_GLOB_CHARS = frozenset("*?[")
_IGNORE_PILLOW = ("ignore", None, Warning, re.compile(r"PIL(\.|$)"), 0)  # a warnings.filters entry

PathLike = str | os.PathLike

logging.getLogger("PIL").addHandler(logging.NullHandler())


class ImageError(Exception):
    """A file that cannot be used as an image; ``str(e)`` is ``"{path}: {reason}"``."""

    def __init__(self, path: PathLike, reason: str):
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(printable(f"{self.path}: {self.reason}"))

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def is_image_file(path: PathLike) -> bool:
    """Whether ``path`` has an image extension (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def open_image(path: PathLike, *, min_side: int = MIN_SIDE) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image (EXIF orientation applied, first frame).

    Transparent images are composited on white; 16-bit images are scaled (not clipped) to 8 bits.
    Images whose width or height is below ``min_side`` pixels, or whose pixel count exceeds
    Pillow's ``Image.MAX_IMAGE_PIXELS`` (decompression-bomb limit), are rejected.

    Raises:
        ImageError: for any file that cannot be decoded, with a human reason.
    """
    path = Path(path)
    return decode_image(_read_bytes(path), path, min_side=min_side)


def decode_image(data: bytes, path: PathLike, *, min_side: int = MIN_SIDE) -> Image.Image:
    """``open_image`` for bytes already read (e.g. a tar member); ``path`` names them in errors."""
    _silence_pillow()
    path = Path(path)
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(path, _not_an_image_reason(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(path, _bomb_reason(None)) from None
    except Exception as e:
        raise ImageError(path, _decode_reason(e)) from None

    width, height = img.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageError(path, _bomb_reason((width, height)))
    if min(width, height) < min_side:
        raise ImageError(path, f"too small ({width}x{height}); each side must be >= {min_side} px")

    try:
        img.seek(0)
        img.load()
    except Exception as e:
        raise ImageError(path, _decode_reason(e)) from None
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        pass  # unreadable EXIF: keep the stored orientation rather than reject the pixels
    try:
        return to_rgb(img)
    except Exception as e:
        raise ImageError(path, f"unsupported colour mode {img.mode!r} ({_short(e)})") from None


def _silence_pillow() -> None:
    """Put the filter ignoring Pillow's warnings first (again, if a catch_warnings dropped it)."""
    if warnings.filters[:1] != [_IGNORE_PILLOW]:
        warnings.filterwarnings("ignore", module=_IGNORE_PILLOW[3].pattern)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on ``BACKGROUND``)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_uint8(img), "L").convert("RGB")
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """16/32-bit integer modes use the 16-bit range; float mode 'F' in [0, 1] (else [0, 255])."""
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        a = np.nan_to_num(a)
        a = a * 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else a
    else:
        a = np.clip(a, 0, 65535) / 257.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _read_bytes(path: Path) -> bytes:
    """The bytes of a regular file of at most ``MAX_IMAGE_BYTES`` (checked before reading)."""
    try:
        with open_regular(path, MAX_IMAGE_BYTES) as f:
            data = f.read()
    except FileRefused as e:
        raise ImageError(
            path, e.reason if os.path.exists(path) else _missing_reason(path)
        ) from None
    except OSError as e:
        raise ImageError(path, f"cannot read file ({_short(e)})") from None
    except MemoryError:
        raise ImageError(path, "not enough memory to read this file") from None
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    return data


def _not_an_image_reason(data: bytes) -> str:
    text = data[:1024].decode("utf-8", errors="replace")
    binary = sum(c == "\ufffd" or (c < " " and c not in "\t\r\n\f") for c in text)
    if binary <= 0.02 * len(text):
        if "<html" in text.lower() or "<!doctype html" in text.lower():
            return "not an image (an HTML page; a failed download?)"
        return "not an image (a text file)"
    return "not an image (unrecognised file format)"


def _bomb_reason(size: tuple[int, int] | None) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    dims = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels " if size else ""
    return (
        f"too large: {dims}exceeds Pillow's decompression-bomb limit of {limit} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS)"
    )


def _decode_reason(e: Exception) -> str:
    msg = _short(e)
    low = msg.lower()
    if isinstance(e, MemoryError):
        return "not enough memory to decode this image"
    if "unsupported" in low or "not supported" in low:
        return f"unsupported image variant ({msg})"
    return f"truncated or corrupt image data ({msg})"


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


# --------------------------------------------------------------------------------------------
# discovery


def find_images(
    sources: PathLike | Sequence[PathLike], recursive: bool = True
) -> tuple[list[Path], list[ImageError]]:
    """Expand ``sources`` into image paths (not decoded) and a list of errors.

    Each source is an image file (any extension is accepted when named explicitly), a folder
    (walked recursively, following symlinked folders without looping, skipping hidden names and
    silently ignoring files without an image extension), a glob pattern (``**`` allowed), or a
    ``.txt`` file listing one source per line (blank lines and ``#`` comments skipped; relative
    entries resolved against the list file's folder). Sources keep their given order; folder and
    glob contents are sorted (depth-first by path components). A file reached twice is kept once.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    finder = _Finder(recursive)
    for source in sources:
        finder.add(source, base=None)
    return finder.paths, finder.errors


class _Finder:
    def __init__(self, recursive: bool):
        self.recursive = recursive
        self.paths: list[Path] = []
        self.errors: list[ImageError] = []
        self._seen_files: set[str] = set()
        self._seen_dirs: set[str] = set()
        self._seen_lists: set[str] = set()

    def add(self, source: PathLike, base: Path | None) -> None:
        path = Path(source).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if path.is_dir():
            self._walk(path)
        elif path.is_file():
            if path.suffix.lower() == ".txt":
                self._read_list(path)
            else:
                self._keep(path)
        elif _GLOB_CHARS & set(str(source)):
            self._glob(path)
        else:
            self.errors.append(ImageError(path, _missing_reason(path)))

    def _keep(self, path: Path, key: str | None = None) -> None:
        key = key or os.path.realpath(path)
        if key not in self._seen_files:
            self._seen_files.add(key)
            self.paths.append(path)

    def _read_list(self, path: Path) -> None:
        key = os.path.realpath(path)
        if key in self._seen_lists:
            return
        self._seen_lists.add(key)
        try:
            lines = read_text(path, MAX_LIST_BYTES).splitlines()
        except InputError as e:
            reason = e.reason if isinstance(e, FileRefused) else str(e).removeprefix(f"{path}: ")
            self.errors.append(ImageError(path, f"cannot read path list ({reason})"))
            return
        for line in lines:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                self.add(entry, base=path.parent)

    def _glob(self, pattern: Path) -> None:
        matches = sorted(glob.glob(str(pattern), recursive=True), key=lambda s: Path(s).parts)
        if not matches:
            self.errors.append(ImageError(pattern, "no files match this pattern"))
        for match in matches:
            path = Path(match)
            if path.is_dir():
                self._walk(path)
            elif is_image_file(path) and not path.name.startswith("."):
                if path.is_file():
                    self._keep(path)
                else:
                    self.errors.append(ImageError(path, _missing_reason(path)))

    def _walk(self, folder: Path) -> None:
        real = os.path.realpath(folder)
        if real in self._seen_dirs:
            return  # symlink loop, or a folder already reached through another link
        self._seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            self.errors.append(ImageError(folder, f"cannot list folder ({_os_reason(e)})"))
            return
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if _is_dir(entry):
                if self.recursive:
                    self._walk(folder / name)
            elif is_image_file(name):
                if _is_file(entry):
                    # the real path without a syscall per file, unless the file is a link
                    key = None if entry.is_symlink() else os.path.join(real, name)
                    self._keep(folder / name, key)
                else:
                    self.errors.append(ImageError(folder / name, _missing_reason(folder / name)))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _missing_reason(path: Path) -> str:
    """Why ``path`` is not a readable regular file (a FIFO, a device, a broken link, ...)."""
    try:
        check_regular_file(path)
    except FileRefused as e:
        if os.path.exists(path):
            return e.reason
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "symbolic link loop"
            return f"broken symbolic link (target {os.readlink(path)!r} not found)"
    return "file not found"


def _os_reason(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "permission denied"
    return _short(e)
