"""A folder of good and bad image files, generated in milliseconds, shared by the tests.

``make_corpus(dirpath)`` returns ``{"good": [paths], "bad": {path: reason keyword},
"sizes": {good path: (width, height) after open_image}, "ignored": [paths]}``. ``ignored`` files
must not be found at all (hidden files, non-image extensions). Every ``bad`` path must be reported
exactly once, either by ``find_images`` (links) or when decoded (everything else).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, features

# Pixel counts either side of Pillow's decompression-bomb thresholds (default 89_478_485).
BOMB_WARNING_SIZE = (10_000, 10_000)  # above MAX_IMAGE_PIXELS: Pillow only warns
BOMB_ERROR_SIZE = (20_000, 20_000)  # above 2 * MAX_IMAGE_PIXELS: Pillow raises


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (its pixel data is missing)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random-noise image (incompressible, so truncation cuts real pixel data)."""
    channels = {"RGB": 3, "L": 1}[mode]
    a = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(a.squeeze(-1) if channels == 1 else a, mode)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_corpus(dirpath: str | os.PathLike) -> dict:
    """Write the corpus into ``dirpath`` (created if needed) and describe what each file is."""
    root = Path(dirpath)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    good: dict[Path, tuple[int, int]] = {}
    bad: dict[Path, str] = {}
    ignored: list[Path] = []

    def write(name: str, data: bytes) -> Path:
        path = root / name
        path.write_bytes(data)
        return path

    def add_good(name: str, img: Image.Image, fmt: str, size=None, **kwargs) -> Path:
        path = write(name, encode(img, fmt, **kwargs))
        good[path] = size or img.size
        return path

    # good images, one per decoding path of open_image
    add_good("rgb.png", noise(32, 24), "PNG")
    add_good("photo.jpg", noise(40, 30, seed=1), "JPEG", quality=90)
    add_good("png_named.jpg", noise(16, 16, seed=2), "PNG")  # right bytes, wrong extension
    add_good("tiny_1x1.png", Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")
    add_good("elongated_2x3000.png", noise(2, 3000, seed=3), "PNG")
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)
    add_good("gray16.png", Image.fromarray(ramp), "PNG")
    add_good("cmyk.jpg", Image.new("CMYK", (12, 10), (0, 255, 255, 0)), "JPEG")
    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    add_good("palette_transparent.png", palette, "PNG", transparency=0)
    add_good("gray.png", noise(9, 7, seed=4, mode="L"), "PNG")
    add_good("gray_alpha.png", Image.new("LA", (5, 5), (0, 0)), "PNG")
    add_good("rgba.png", Image.new("RGBA", (6, 4), (0, 0, 255, 128)), "PNG")
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    add_good("animated.gif", frames[0], "GIF", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    halves = Image.new("RGB", (20, 10), (255, 255, 255))
    halves.paste((0, 0, 0), (0, 0, 10, 10))  # left half black: the top half once displayed
    add_good("exif_rotated.jpg", halves, "JPEG", size=(10, 20), exif=exif)
    add_good("image.bmp", noise(7, 5, seed=6), "BMP")
    add_good("image.TIFF", noise(7, 5, seed=7), "TIFF")  # upper-case extension
    if features.check("webp"):
        add_good("image.webp", noise(8, 8, seed=8), "WEBP", lossless=True)
    add_good("sub/nested.png", noise(5, 5, seed=9), "PNG")

    unreadable = add_good("unreadable.png", noise(4, 4, seed=10), "PNG")
    unreadable.chmod(0)
    if not os.access(unreadable, os.R_OK):  # as root, mode 000 files are still readable
        del good[unreadable]
        bad[unreadable] = "permission denied"

    # bad files, reported when decoded
    bad[write("empty.jpg", b"")] = "empty"
    jpeg = encode(noise(64, 64, seed=11), "JPEG", quality=95)
    bad[write("truncated.jpg", jpeg[: len(jpeg) * 6 // 10])] = "truncated"
    png = encode(noise(64, 64, seed=12), "PNG")
    bad[write("truncated.png", png[: len(png) * 6 // 10])] = "truncated"
    bad[write("text.jpg", b"just some notes, not a picture\n")] = "text file"
    bad[write("page.jpg", b"<!DOCTYPE html><html><body>404</body></html>")] = "HTML"
    bad[write("binary.png", bytes(range(255, -1, -1)) * 8)] = "not an image"
    bad[write("bomb_warning.png", png_header_only(*BOMB_WARNING_SIZE))] = "decompression-bomb"
    bad[write("bomb_error.png", png_header_only(*BOMB_ERROR_SIZE))] = "decompression-bomb"

    # bad links, reported by find_images
    (root / "broken.jpg").symlink_to("does_not_exist.jpg")
    bad[root / "broken.jpg"] = "broken symbolic link"
    (root / "self_loop.png").symlink_to("self_loop.png")
    bad[root / "self_loop.png"] = "link loop"
    (root / "sub" / "loop").symlink_to("..", target_is_directory=True)  # folder loop: no error

    # never found
    for name, data in (
        (".hidden.png", encode(noise(4, 4), "PNG")),
        (".hidden_dir/inside.png", encode(noise(4, 4), "PNG")),
        ("notes.md", b"# notes\n"),
        ("labels.csv", b"a,b\n"),
    ):
        (root / name).parent.mkdir(exist_ok=True)
        ignored.append(write(name, data))

    return {"good": sorted(good), "bad": bad, "sizes": good, "ignored": ignored}
