"""open_image decodes every kind of image to RGB or fails with one clear ImageError line;
find_images discovers files deterministically without decoding them."""

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from image_corpus import encode, make_corpus, noise
from PIL import Image

from mlx_aim.data.images import IMAGE_EXTENSIONS, ImageError, find_images, open_image

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def pixels(path) -> np.ndarray:
    return np.asarray(open_image(path))


def test_image_error_is_one_line_with_path_and_reason():
    e = ImageError("photos/a.jpg", "truncated or corrupt\nimage data")
    assert e.path == Path("photos/a.jpg")
    assert e.reason == "truncated or corrupt image data"
    assert str(e) == "photos/a.jpg: truncated or corrupt image data"
    clone = pickle.loads(pickle.dumps(e))  # survives process pools
    assert (clone.path, clone.reason) == (e.path, e.reason)


def test_image_extensions():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def test_good_images_decode_to_rgb_with_expected_size(corpus):
    for path in corpus["good"]:
        img = open_image(path)
        assert img.mode == "RGB", path
        assert img.size == corpus["sizes"][path], path


def test_bad_images_raise_image_error_naming_file_and_reason(corpus):
    for path, keyword in corpus["bad"].items():
        with pytest.raises(ImageError) as info:
            open_image(path)
        assert info.value.path == path
        assert keyword.lower() in info.value.reason.lower(), str(info.value)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_exif_orientation_is_applied(corpus):
    a = pixels(corpus["good"][[p.name for p in corpus["good"]].index("exif_rotated.jpg")])
    assert a.shape == (20, 10, 3)  # stored 20 wide, displayed 10 wide
    assert a[:8].mean() < 30 and a[12:].mean() > 225  # stored left (black) is displayed on top


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    a = pixels(tmp_path / "g16.png")
    np.testing.assert_array_equal(a[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert (a[..., 0] == a[..., 2]).all() and len(np.unique(a)) == 64


def test_transparency_is_composited_on_white(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "p.png", transparency=0)
    a = pixels(tmp_path / "p.png")
    assert tuple(a[0, 0]) == (255, 255, 255) and tuple(a[1, 1]) == (255, 0, 0)
    Image.new("RGBA", (3, 3), (0, 0, 255, 128)).save(tmp_path / "rgba.png")
    assert tuple(pixels(tmp_path / "rgba.png")[0, 0]) == (127, 127, 255)
    Image.new("LA", (3, 3), (0, 0)).save(tmp_path / "la.png")
    assert (pixels(tmp_path / "la.png") == 255).all()


def test_cmyk_and_first_gif_frame_colours(corpus):
    by_name = {p.name: p for p in corpus["good"]}
    assert tuple(pixels(by_name["cmyk.jpg"])[5, 5]) == pytest.approx((255, 0, 0), abs=2)
    assert tuple(pixels(by_name["animated.gif"])[4, 4]) == (255, 0, 0)


def test_one_pixel_images_are_accepted_unless_min_side_is_larger(corpus):
    tiny = next(p for p in corpus["good"] if p.name == "tiny_1x1.png")
    assert tuple(pixels(tiny)[0, 0]) == (10, 20, 30)
    with pytest.raises(ImageError, match=r"too small \(1x1\)"):
        open_image(tiny, min_side=2)


def test_decompression_bomb_limit_is_pillows_default(corpus):
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="10000x10000 = 100000000 pixels exceeds"):
        open_image(next(p for p in corpus["bad"] if p.name == "bomb_warning.png"))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        open_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match=r"not a regular file \(a directory\)"):
        open_image(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files with mode 000")
def test_permission_denied(tmp_path):
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    with pytest.raises(ImageError, match="permission denied"):
        open_image(path)


def test_pillow_warnings_do_not_reach_the_user(corpus):
    """Even under ``simplefilter("always")`` decoding the corpus emits nothing, though Pillow
    itself warns about the smaller bomb."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in [*corpus["good"], *corpus["bad"]]:
            try:
                open_image(path)
            except ImageError:
                pass
        assert caught == []
        with pytest.warns(Image.DecompressionBombWarning):  # what Pillow alone does
            Image.open(next(p for p in corpus["bad"] if p.name == "bomb_warning.png"))


def test_pillow_log_records_are_not_printed(tmp_path):
    """Pillow logs an ERROR record for this corrupt TIFF; without logging configured (a plain
    script) nothing may reach stderr."""
    entry = b"\x15\x01\x03\x00\x01\x00\x00\x00\x03\x00"  # SamplesPerPixel = 3
    data = encode(noise(4, 4), "TIFF")
    assert entry in data
    path = tmp_path / "spp.tif"
    path.write_bytes(data.replace(entry, entry[:8] + b"\x88\x13"))  # 5000 samples per pixel
    code = "import sys\nfrom mlx_aim.data.images import open_image\nopen_image(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True)
    assert "ImageError" in done.stderr and "More samples" not in done.stderr


HEADERS = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
]
SAMPLES = [
    encode(noise(6, 5), "PNG"),
    encode(noise(6, 5), "JPEG"),
    encode(noise(6, 5), "GIF"),
    encode(noise(6, 5), "TIFF"),
    encode(noise(6, 5), "BMP"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.builds(lambda h, t: h + t, st.sampled_from(HEADERS), st.binary(max_size=512)),
        st.builds(
            lambda s, i, b, n: (s[:i] + bytes([b]) + s[i + 1 :])[: len(s) - n],
            st.sampled_from(SAMPLES),
            st.integers(0, 200),
            st.integers(0, 255),
            st.integers(0, 40),
        ),
    )
)
def test_open_image_on_arbitrary_bytes_only_raises_image_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz.img"
    path.write_bytes(data)
    try:
        img = open_image(path)
    except ImageError as e:
        assert e.reason and "\n" not in str(e)
    else:
        assert img.mode == "RGB" and min(img.size) >= 1


# ---- find_images ------------------------------------------------------------------------


def test_find_images_over_the_corpus(corpus, tmp_path):
    root = corpus["good"][0].parent
    paths, errors = find_images(root)
    link_errors = {p: k for p, k in corpus["bad"].items() if p.is_symlink()}
    decode_bad = set(corpus["bad"]) - set(link_errors)
    assert set(paths) == set(corpus["good"]) | decode_bad
    assert len(paths) == len(set(paths))  # the folder symlink loop adds no duplicates
    assert not set(paths) & set(corpus["ignored"])
    assert sorted(paths, key=lambda p: p.parts) == paths
    assert {e.path: e for e in errors}.keys() == link_errors.keys() and len(errors) == 2
    for e in errors:
        assert link_errors[e.path] in e.reason
    again_paths, again_errors = find_images(root)
    assert again_paths == paths and [str(e) for e in again_errors] == [str(e) for e in errors]


def test_find_images_not_recursive(corpus):
    root = corpus["good"][0].parent
    paths, _ = find_images(root, recursive=False)
    assert root / "sub" / "nested.png" not in paths and root / "rgb.png" in paths


def test_explicit_files_keep_order_any_extension_and_dedupe(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.data", format="PNG")
    sources = [tmp_path / "b.png", tmp_path / "a.data", tmp_path / "b.png", tmp_path / "no.jpg"]
    paths, errors = find_images(sources)
    assert paths == [tmp_path / "b.png", tmp_path / "a.data"]
    assert [str(e) for e in errors] == [f"{tmp_path / 'no.jpg'}: file not found"]
    assert open_image(paths[1]).size == (4, 4)


def test_glob_patterns(tmp_path):
    for name in ("x/1.png", "x/2.JPG", "x/y/3.png", "x/notes.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"-")
    paths, errors = find_images(str(tmp_path / "x" / "*.png"))
    assert paths == [tmp_path / "x/1.png"] and errors == []
    paths, _ = find_images(str(tmp_path / "x" / "**" / "*"))
    assert paths == [tmp_path / n for n in ("x/1.png", "x/2.JPG", "x/y/3.png")]
    paths, errors = find_images(str(tmp_path / "none" / "*.png"))
    assert paths == [] and "no files match" in errors[0].reason


def test_path_list_file_resolves_relative_entries(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "imgs").mkdir()
    for name in ("c.png", "a.png"):
        (tmp_path / "imgs" / name).write_bytes(b"-")
    listing = "# my selection\n../imgs/c.png\n\n  ../imgs/a.png  \n../imgs/gone.png\n"
    (tmp_path / "lists" / "sel.txt").write_text(listing)
    paths, errors = find_images(tmp_path / "lists" / "sel.txt")
    assert [p.name for p in paths] == ["c.png", "a.png"]  # the list's order
    assert len(errors) == 1 and errors[0].path.name == "gone.png"


def test_non_regular_files_are_named_once_and_skipped_on_every_discovery_path(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(folder / "ok.png")
    os.mkfifo(folder / "f.jpg")
    (folder / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "list.txt").write_text("d/f.jpg\nd/ok.png\nd/zero.png\n")
    os.mkfifo(tmp_path / "fifo.txt")
    expected = {
        folder / "f.jpg": "not a regular file (a FIFO)",
        folder / "zero.png": "not a regular file (a character device)",
    }
    explicit = [folder / "f.jpg", folder / "ok.png", folder / "zero.png"]  # as from stdin
    for sources in (folder, str(folder / "*"), tmp_path / "list.txt", explicit):
        paths, errors = find_images(sources)
        assert paths == [folder / "ok.png"]
        assert {e.path: e.reason for e in errors} == expected
    paths, errors = find_images(tmp_path / "fifo.txt")
    assert paths == [] and [str(e) for e in errors] == [
        f"{tmp_path / 'fifo.txt'}: not a regular file (a FIFO)"
    ]


def test_files_too_large_to_be_an_image_are_refused_before_reading(tmp_path):
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(40 * 2**30)  # sparse: costs no disk
    with pytest.raises(ImageError, match="too large: 40960 MiB, above the 1024 MiB limit"):
        open_image(tmp_path / "huge.png")


def test_symlinked_folders_are_followed_once(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "r.png").write_bytes(b"-")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "data" / "link" / "back").symlink_to(tmp_path / "data", target_is_directory=True)
    paths, errors = find_images(tmp_path / "data")
    assert paths == [tmp_path / "data" / "link" / "r.png"] and errors == []
