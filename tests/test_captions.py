"""Image-caption pairs (mlx_aim/data/captions.py) and the caption tokenizer (text/caption_bpe.py)."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_aim.data import captions as captions_module
from mlx_aim.data.captions import find_captioned_images
from mlx_aim.data.loader import ImageLoader
from mlx_aim.errors import InputError
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
