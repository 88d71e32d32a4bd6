"""Image-caption pairs (mlx_aim/data/captions.py) and the caption tokenizer (text/caption_bpe.py)."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_aim.data import captions as captions_module
from mlx_aim.data.captions import find_captioned_images
from mlx_aim.data.loader import ImageLoader
from mlx_aim.errors import InputError
from mlx_aim.text import caption_bpe
from mlx_aim.text.caption_bpe import CaptionTokenizer

pytest.importorskip("tokenizers")


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def reasons(found) -> dict[str, str]:
    return {e.path.name: e.reason for e in found.skipped}


def test_sidecar_captions_in_nested_folders(tmp_path):
    write(tmp_path / "cat.png", png_bytes(0))
    write(tmp_path / "cat.txt", "  a  cat\non a mat \n")
    write(tmp_path / "sub" / "dog.png", png_bytes(1))
    write(tmp_path / "sub" / "dog.txt", "a dog")
    write(tmp_path / "bird.png", png_bytes(2))  # no caption
    write(tmp_path / "fish.png", png_bytes(3))
    write(tmp_path / "fish.txt", " \n ")
    found = find_captioned_images(tmp_path)
    assert [p.name for p in found.images] == ["cat.png", "dog.png"]
    assert found.captions == ["a cat on a mat", "a dog"]
    assert reasons(found) == {
        "bird.png": "no caption (expected bird.txt)",
        "fish.png": "empty caption",
    }


def test_jsonl_and_csv_listings_are_relative_to_their_file(tmp_path):
    write(tmp_path / "img" / "a.png", png_bytes(0))
    write(tmp_path / "img" / "b.png", png_bytes(1))
    rows = [
        {"image": "img/a.png", "caption": "first"},
        {"image": "img/missing.png", "caption": "gone"},
        {"image": "img/b.png", "caption": ""},
    ]
    listing = write(tmp_path / "pairs.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    found = find_captioned_images(listing)
    assert found.images == [tmp_path / "img" / "a.png"] and found.captions == ["first"]
    assert reasons(found) == {
        "missing.png": f"not found (listed at {listing}:2)",
        "b.png": "empty caption",
    }
    table = write(tmp_path / "pairs.csv", 'image,caption\nimg/b.png,"second, with a comma"\n')
    found = find_captioned_images(table)
    assert found.images == [tmp_path / "img" / "b.png"]
    assert found.captions == ["second, with a comma"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", '{"image": "a.png", "caption": "x"}\n{oops\n', r"bad.jsonl:2: invalid JSON"),
        ("bad.jsonl", '["a.png", "x"]\n', r"bad.jsonl:1: expected an object"),
        ("bad.csv", "path,text\na.png,x\n", r"bad.csv: needs a header"),
        ("deep.jsonl", "[" * 100_000 + "\n", r"deep.jsonl:1: invalid JSON \(nested too deeply\)"),
        (
            "huge.csv",
            "image,caption\na.png," + "x" * 140_000 + "\n",
            r"huge.csv:\d+: not a readable",
        ),
    ],
)
def test_malformed_listings_name_the_file_and_line(tmp_path, name, text, message):
    with pytest.raises(InputError, match=message):
        find_captioned_images(write(tmp_path / name, text))


def test_csv_with_cr_only_line_endings_is_read(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    table = tmp_path / "mac.csv"
    table.write_bytes(b'image,caption\ra.png,a red square\rb.png,"two\rlines"\r')
    found = find_captioned_images(table)
    assert found.images == [tmp_path / "a.png"] and found.captions == ["a red square"]
    assert [e.path for e in found.skipped] == [tmp_path / "b.png"]  # listed but missing


def write_shard(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def test_tar_shards_pair_members_by_key_and_read_images_in_place(tmp_path):
    shard = write_shard(
        tmp_path / "000.tar",
        {
            "000/0001.jpg.json": b"{}",
            "000/0001.png": png_bytes(0),
            "000/0001.txt": b"a red square",
            "000/0002.png": png_bytes(1),  # no caption
            "000/0003.txt": b"a caption without an image",
        },
        link="000/0004.png",  # not a regular member: ignored
    )
    found = find_captioned_images(shard)
    assert found.images == [shard / "000" / "0001.png"] and found.captions == ["a red square"]
    assert reasons(found) == {"0002.png": "no caption (expected 000/0002.txt in the shard)"}
    decoded = np.asarray(found.open_image(found.images[0]))
    assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(png_bytes(0)))))

    loader = ImageLoader(
        found.images, lambda img, rng: np.asarray(img), 1, num_workers=0, opener=found.open_image
    )
    assert next(iter(loader))["images"].shape == (1, 6, 6, 3)


def test_a_glob_reads_every_shard_and_oversized_members_are_skipped(tmp_path, monkeypatch):
    write_shard(tmp_path / "a.tar", {"x.png": png_bytes(0), "x.txt": b"one"})
    write_shard(tmp_path / "b.tar", {"y.png": png_bytes(1), "y.txt": b"two" * 20})
    monkeypatch.setattr(captions_module, "MAX_CAPTION_BYTES", 10)
    found = find_captioned_images(tmp_path / "*.tar")
    assert found.captions == ["one"]
    assert reasons(found) == {
        "y.txt": "caption too large",
        "y.png": "no caption (expected y.txt in the shard)",
    }


def test_unusable_sources_raise_one_line(tmp_path):
    with pytest.raises(InputError, match="not a folder of captioned images"):
        find_captioned_images(tmp_path / "nothing")
    with pytest.raises(InputError, match="not a readable tar shard"):
        find_captioned_images(write(tmp_path / "broken.tar", b"not a tar" * 100))


CAPTIONS = ["two red circles", "a small blue square on the left", "a green triangle"] * 20


def test_tokenizer_trains_saves_and_loads(tmp_path):
    tokenizer = CaptionTokenizer.train(CAPTIONS, vocab_size=300)
    assert (tokenizer.pad, tokenizer.bos, tokenizer.eos) == (0, 1, 2)
    assert 259 < tokenizer.vocab_size <= 300
    ids = tokenizer.encode(["a small blue square, é!"])[0]
    assert tokenizer.decode(ids) == "a small blue square, é!"  # byte-level: any text encodes
    rows = tokenizer.sequences(CAPTIONS[:2], 8)
    assert rows[:, 0].tolist() == [1, 1] and rows.shape == (2, 9)
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = CaptionTokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.encode(CAPTIONS) == tokenizer.encode(CAPTIONS)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(InputError, match="--vocab-size must be at least 259"):
        CaptionTokenizer.train(CAPTIONS, vocab_size=100)
    with pytest.raises(InputError, match="not a tokenizers tokenizer.json"):
        CaptionTokenizer.load(write(tmp_path / "bad.json", "{}"))
    import tokenizers

    plain = tokenizers.Tokenizer(tokenizers.models.BPE())
    write(tmp_path / "plain.json", plain.to_str())
    with pytest.raises(InputError, match=r"no special token\(s\) \[PAD\], \[BOS\], \[EOS\]"):
        CaptionTokenizer.load(tmp_path / "plain.json")


def pax_member_claiming(name: str, size: int) -> bytes:
    """A pax header block and header for ``name`` that claim ``size`` bytes of data."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.PAX_FORMAT)


def test_a_member_claiming_more_than_the_shard_holds_is_named(tmp_path):
    shard = write_shard(tmp_path / "pax.tar", {"x.png": png_bytes(0), "x.txt": b"one"})
    raw = shard.read_bytes()
    end = raw.rindex(b"one") + 512  # after the last member's data block
    lie = pax_member_claiming("y.png", 99_999_999_999_999)
    shard.write_bytes(raw[:end] + lie + b"\0" * 1024)
    with pytest.raises(InputError, match=r"pax\.tar: y\.png claims 99999999999999 bytes, only"):
        find_captioned_images(shard)


@pytest.mark.parametrize("cut", [200, 511, 0], ids=["in-header", "header-end", "no-end-marker"])
def test_a_shard_cut_short_is_named_not_silently_shortened(tmp_path, cut):
    shard = write_shard(
        tmp_path / "cut.tar",
        {"a.png": png_bytes(0), "a.txt": b"first", "b.png": png_bytes(1), "b.txt": b"second"},
    )
    with tarfile.open(shard) as tar:
        last_header = tar.getmember("b.txt").offset
    shard.write_bytes(shard.read_bytes()[: last_header + cut])
    with pytest.raises(InputError, match=rf"cut\.tar: cut short at byte {last_header}"):
        find_captioned_images(shard)


def test_the_same_member_name_in_two_shards_is_two_images(tmp_path):
    for shard, seed, caption in (("a.tar", 0, b"first"), ("b.tar", 1, b"second")):
        write_shard(tmp_path / shard, {"/data/x.png": png_bytes(seed), "/data/x.txt": caption})
    found = find_captioned_images(tmp_path / "*.tar")
    assert len(set(found.images)) == 2 and found.captions == ["first", "second"]
    for image, seed in zip(found.images, (0, 1), strict=True):
        assert image.is_relative_to(tmp_path)
        decoded = np.asarray(found.open_image(image))
        assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(png_bytes(seed)))))


LONG = "word " * 60_000 + "x" * 300_000  # 600,000 characters


@pytest.mark.parametrize("kind", ["sidecar", "jsonl", "tar"])
def test_a_caption_over_the_limit_is_cut_and_named(tmp_path, kind, caplog):
    write(tmp_path / "img" / "a.png", png_bytes(0))
    if kind == "sidecar":
        source = write(tmp_path / "img" / "a.txt", LONG).parent
    elif kind == "jsonl":
        source = write(tmp_path / "l.jsonl", json.dumps({"image": "img/a.png", "caption": LONG}))
    else:
        source = write_shard(tmp_path / "s.tar", {"a.png": png_bytes(0), "a.txt": LONG.encode()})
    with caplog.at_level("WARNING", logger="mlx_aim"):
        found = find_captioned_images(source)
    limit = captions_module.MAX_CAPTION_CHARS
    assert len(found.captions) == 1 and len(found.captions[0]) == limit
    assert LONG.startswith(found.captions[0])
    assert f"1 caption cut to {limit} characters: " in caplog.text
    assert "a.png" in caplog.text


def test_tokenizer_training_sees_each_caption_cut_to_the_limit(monkeypatch):
    seen = []
    real = caption_bpe._learn

    def spy(tokenizer, captions, trainer):
        seen.extend(captions)
        real(tokenizer, captions, trainer)

    monkeypatch.setattr(caption_bpe, "_learn", spy)
    CaptionTokenizer.train(["a b c", "y" * 100_000], vocab_size=300)
    assert seen == ["a b c", "y" * captions_module.MAX_CAPTION_CHARS]


def test_a_glob_names_and_skips_matches_that_are_not_regular_files(tmp_path):
    write_shard(tmp_path / "a.tar", {"x.png": png_bytes(0), "x.txt": b"one"})
    os.mkfifo(tmp_path / "fifo.tar")
    (tmp_path / "folder.tar").mkdir()
    found = find_captioned_images(tmp_path / "*.tar")
    assert found.captions == ["one"]
    assert reasons(found) == {
        "fifo.tar": "not a regular file (a FIFO)",
        "folder.tar": "not a regular file (a directory)",
    }


def test_json_lines_may_hold_a_raw_line_separator_in_a_caption(tmp_path):
    write(tmp_path / "a.png", png_bytes(0))
    write(tmp_path / "b.png", png_bytes(1))
    rows = [{"image": "a.png", "caption": "one\u2028two"}, {"image": "b.png", "caption": "three"}]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    found = find_captioned_images(write(tmp_path / "l.jsonl", text))
    assert found.captions == ["one two", "three"]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("l.csv", "image,caption\r\na.png,one\r\n"),
        ("l.jsonl", '{"image": "a.png", "caption": "one"}'),
    ],
)
def test_a_listing_saved_with_a_byte_order_mark_reads_its_header(tmp_path, name, text):
    write(tmp_path / "a.png", png_bytes(0))
    found = find_captioned_images(write(tmp_path / name, "\ufeff" + text))  # as Excel saves
    assert found.captions == ["one"]
