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

Captions are stripped and their whitespace collapsed to single spaces. Images without a caption,
empty captions and listed files that do not exist are named once (``skipped``) and left out;
unreadable images are reported by the loader when decoded.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import InputError
from ..io import open_regular, read_text
from .images import ImageError, PathLike, decode_image, find_images, is_image_file, open_image

MAX_IMAGE_BYTES = 64 * 2**20
MAX_CAPTION_BYTES = 2**20


@dataclass
class CaptionedImages:
    """Image paths (tar members as ``<shard>/<member>``), their captions and what was skipped."""

    images: list[Path] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: list[ImageError] = field(default_factory=list)
    members: dict[Path, tuple[Path, int, int]] = field(default_factory=dict)  # (shard, at, size)

    def add(self, image: Path, caption: str | None, expected: str = "a caption") -> None:
        """Keep ``image`` with its caption, or name it in ``skipped`` when the caption is empty."""
        text = " ".join((caption or "").split())
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
        shards = sorted(glob.glob(str(path)))
        if not shards or not all(s.lower().endswith(".tar") for s in shards):
            raise InputError(f"{source}: the pattern must match .tar shards")
        for shard in shards:
            _read_shard(Path(shard), found)
    else:
        raise InputError(
            f"{source}: not a folder of captioned images, a .jsonl or .csv listing, or .tar shards"
        )
    return found


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
    for line, text in enumerate(read_text(path).splitlines(), 1):
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
    reader = csv.DictReader(io.StringIO(read_text(path), newline=None))  # CR-only endings too
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
            for member in tar:
                if not member.isreg():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, extension = base.partition(".")
                key = f"{folder}/{stem}"
                if extension.lower() == "txt":
                    if member.size > MAX_CAPTION_BYTES:
                        found.skipped.append(ImageError(shard / member.name, "caption too large"))
                        continue
                    data = tar.extractfile(member).read()
                    captions[key] = data.decode("utf-8", errors="replace")
                elif is_image_file(member.name):
                    if member.size > MAX_IMAGE_BYTES:
                        found.skipped.append(ImageError(shard / member.name, "image too large"))
                        continue
                    images[key] = (shard / member.name, member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"{shard}: not a readable tar shard ({e})") from None
    for key, (path, offset, size) in images.items():
        found.add(path, captions.get(key), expected=f"{key.lstrip('/')}.txt in the shard")
        found.members[path] = (shard, offset, size)
