"""Image-caption pairs on disk: sidecar captions, JSONL/CSV listings and WebDataset tar shards.

``find_captioned_images(source)`` reads, without decoding any image:

- a folder, searched recursively like ``images.find_images``, where each image has its caption
  in a sidecar text file of the same stem (``cat.jpg`` + ``cat.txt``);
- a ``.jsonl`` file of ``{"image": ..., "caption": ...}`` objects, one a line, or a ``.csv`` file
  with ``image`` and ``caption`` columns; image paths are relative to the listing's folder;
- a WebDataset-style ``.tar`` shard (as img2dataset writes: ``key.jpg`` + ``key.txt``, where the
  key is the member name up to the first dot of its base name), or a glob of shards
  (``shards/*.tar``). Shards are read with ``tarfile`` as a stream; only regular members count
  and each is size-checked. Images are not extracted: a tar member is addressed as
  ``<shard>/<member>`` and read from its offset in the shard when loaded (``open_image``).

Captions are stripped, their whitespace collapsed to single spaces and cut to their first
``MAX_CAPTION_CHARS`` characters (one warning names the images whose captions were cut), so one
long caption cannot stall tokenizer training. Images without a caption, empty captions, listed
files that do not exist and glob matches that are not regular files are named once (``skipped``)
and left out; unreadable images are reported by the loader when decoded.

A shard is bounded by its size: a member claiming more bytes than the shard has left, or a shard
cut short (inside a header, or without its end-of-archive blocks), raises InputError naming it.
Members are keyed by shard and name: ``/x.png`` in ``a.tar`` and in ``b.tar`` are two images,
``a.tar/x.png`` and ``b.tar/x.png``.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import InputError
from ..io import FileRefused, check_regular_file, open_regular, read_text
from ..messages import plural
from .images import ImageError, PathLike, decode_image, find_images, is_image_file, open_image

MAX_IMAGE_BYTES = 64 * 2**20
MAX_CAPTION_BYTES = 2**20
MAX_CAPTION_CHARS = 4096  # what one caption contributes to tokenizer training and training
_BLOCK = tarfile.BLOCKSIZE

logger = logging.getLogger("mlx_aim")


@dataclass
class CaptionedImages:
    """Image paths (tar members as ``<shard>/<member>``), their captions and what was skipped."""

    images: list[Path] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: list[ImageError] = field(default_factory=list)
    members: dict[Path, tuple[Path, int, int]] = field(default_factory=dict)  # (shard, at, size)
    cut: list[Path] = field(default_factory=list)  # images whose caption was cut to the limit

    def add(self, image: Path, caption: str | None, expected: str = "a caption") -> None:
        """Keep ``image`` with its caption, or name it in ``skipped`` when the caption is empty."""
        text = " ".join((caption or "").split())
        if len(text) > MAX_CAPTION_CHARS:
            text = text[:MAX_CAPTION_CHARS].rstrip()
            self.cut.append(image)
        if caption is None:
            self.skipped.append(ImageError(image, f"no caption (expected {expected})"))
        elif not text:
            self.skipped.append(ImageError(image, "empty caption"))
        else:
            self.images.append(image)
            self.captions.append(text)

    def open_image(self, path: Path) -> Image.Image:
        """Decode an image file or tar member (an ``ImageLoader`` opener); raises ImageError."""
        if path not in self.members:
            return open_image(path)
        shard, offset, size = self.members[path]
        try:
            with open_regular(shard) as f:
                f.seek(offset)
                data = f.read(size)
        except (InputError, OSError) as e:
            raise ImageError(path, f"cannot read the shard ({e})") from None
        if len(data) != size:
            raise ImageError(path, "truncated tar member")
        return decode_image(data, path)


def find_captioned_images(source: PathLike) -> CaptionedImages:
    """Image-caption pairs of a folder, a ``.jsonl``/``.csv`` listing, a ``.tar`` shard or a glob
    of shards (see the module docstring). InputError when ``source`` is none of these."""
    path = Path(source).expanduser()
    found = CaptionedImages()
    suffix = path.suffix.lower()
    if path.is_dir():
        _read_sidecars(path, found)
    elif suffix == ".tar" and path.is_file():
        _read_shard(path, found)
    elif suffix in (".jsonl", ".csv") and path.is_file():
        rows = _jsonl_rows(path) if suffix == ".jsonl" else _csv_rows(path)
        for line, image, caption in rows:
            image_path = path.parent / image
            if not image_path.is_file():
                found.skipped.append(ImageError(image_path, f"not found (listed at {path}:{line})"))
            else:
                found.add(image_path, caption)
    elif set("*?[") & set(str(source)):
        _read_shards(source, path, found)
    else:
        raise InputError(
            f"{source}: not a folder of captioned images, a .jsonl or .csv listing, or .tar shards"
        )
    if found.cut:
        logger.warning(
            "%s cut to %d characters: %s%s",
            plural(len(found.cut), "caption"),
            MAX_CAPTION_CHARS,
            found.cut[0],
            f" and {len(found.cut) - 1} more" if len(found.cut) > 1 else "",
        )
    return found


def _read_shards(source: PathLike, pattern: Path, found: CaptionedImages) -> None:
    """Read every shard a glob matches; matches that are not regular files are named, skipped."""
    shards = sorted(glob.glob(str(pattern)))
    if not shards or not all(s.lower().endswith(".tar") for s in shards):
        raise InputError(f"{source}: the pattern must match .tar shards")
    for shard in map(Path, shards):
        try:
            check_regular_file(shard)
        except FileRefused as e:
            found.skipped.append(ImageError(shard, e.reason))
            continue
        _read_shard(shard, found)


def _read_sidecars(folder: Path, found: CaptionedImages) -> None:
    images, errors = find_images(folder)
    found.skipped.extend(errors)
    for image in images:
        sidecar = image.with_suffix(".txt")
        try:
            caption = read_text(sidecar, MAX_CAPTION_BYTES) if sidecar.is_file() else None
        except InputError as e:
            found.skipped.append(ImageError(image, f"unreadable caption ({e})"))
            continue
        found.add(image, caption, expected=sidecar.name)


def _jsonl_rows(path: Path):
    # lines end at "\n" only: JSON strings may hold raw U+2028 and other separators splitlines cuts at
    for line, text in enumerate(read_text(path).removeprefix("\ufeff").split("\n"), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as e:
            raise InputError(f"{path}:{line}: invalid JSON ({e.args[0]})") from None
        except RecursionError:
            raise InputError(f"{path}:{line}: invalid JSON (nested too deeply)") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise InputError(f"{path}:{line}: expected an object with 'image' and 'caption'")
        caption = row.get("caption")
        yield line, row["image"], caption if isinstance(caption, str) else None


def _csv_rows(path: Path):
    text = read_text(path).removeprefix("\ufeff")  # Excel's byte order mark
    reader = csv.DictReader(io.StringIO(text, newline=None))  # CR-only endings too
    try:
        if not {"image", "caption"} <= set(reader.fieldnames or ()):
            raise InputError(f"{path}: needs a header with 'image' and 'caption' columns")
        rows = [(reader.line_num, row["image"], row["caption"]) for row in reader if row["image"]]
    except csv.Error as e:  # a field over csv.field_size_limit(), a bare CR inside a field
        raise InputError(
            f"{path}:{max(reader.line_num, 1)}: not a readable CSV row ({e})"
        ) from None
    yield from rows


def _read_shard(shard: Path, found: CaptionedImages) -> None:
    images: dict[str, tuple[Path, int, int]] = {}
    captions: dict[str, str] = {}
    try:
        with open_regular(shard) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            size = os.fstat(f.fileno()).st_size
            for member in tar:
                _check_bounds(shard, member, size)
                if not member.isreg():
                    continue
                name = member.name.lstrip("/")  # inside the shard, whatever the member says
                folder, _, base = name.rpartition("/")
                stem, _, extension = base.partition(".")
                key = f"{folder}/{stem}"
                if extension.lower() == "txt":
                    if member.size > MAX_CAPTION_BYTES:
                        found.skipped.append(ImageError(shard / name, "caption too large"))
                        continue
                    data = tar.extractfile(member).read()
                    captions[key] = data.decode("utf-8", errors="replace")
                elif is_image_file(name):
                    if member.size > MAX_IMAGE_BYTES:
                        found.skipped.append(ImageError(shard / name, "image too large"))
                        continue
                    images[key] = (shard / name, member.offset_data, member.size)
            _check_end(shard, f, tar.offset, size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"{shard}: not a readable tar shard ({e})") from None
    for key, (path, offset, size) in images.items():
        found.add(path, captions.get(key), expected=f"{key.lstrip('/')}.txt in the shard")
        found.members[path] = (shard, offset, size)


def _check_bounds(shard: Path, member: tarfile.TarInfo, size: int) -> None:
    """Refuse a member whose data would run past the end of the shard (a lying header)."""
    left = max(size - member.offset_data, 0)
    if member.size > left:
        raise InputError(
            f"{shard}: {member.name} claims {member.size} bytes, only {left} left in the shard "
            "(a damaged or cut shard)"
        )


def _check_end(shard: Path, f, offset: int, size: int) -> None:
    """Refuse a shard whose members stop before its end-of-archive block (cut or damaged)."""
    f.seek(offset)
    block = f.read(_BLOCK)
    if len(block) < _BLOCK or block.count(0) != _BLOCK:
        raise InputError(
            f"{shard}: cut short at byte {offset} of {size} (a header there is incomplete or "
            "damaged, or the end-of-archive block is missing)"
        )
