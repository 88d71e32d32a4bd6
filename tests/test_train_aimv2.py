"""``mlx-aim train --objective aimv2``: captioned data in, an ordinary AIMv2 trunk out."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_AIMV2_TRUNK
from PIL import Image

import mlx_aim
from mlx_aim.data import captions as captions_module
from mlx_aim.errors import InputError, Interrupted
from mlx_aim.text import caption_bpe
from mlx_aim.text.caption_bpe import CaptionTokenizer
from mlx_aim.train import TrainConfig, train

pytest.importorskip("tokenizers")

TRUNK = TINY_AIMV2_TRUNK
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 noisy single-colour images, each with a sidecar caption naming its colour."""
    root = tmp_path_factory.mktemp("captioned")
    (root / "tiny.json").write_text(json.dumps(TRUNK))
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(24):
        name = list(COLOURS)[i % 3]
        pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 30, (16, 16, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / f"{i:02d}.png")
        (root / "images" / f"{i:02d}.txt").write_text(f"a {name} square")
    return root


def config(data, output, **changes) -> TrainConfig:
    values = dict(
        objective="aimv2",
        model=str(data / "tiny.json"),
        data=str(data / "images"),
        output=str(output),
        steps=6,
        batch_size=4,
        vocab_size=300,
        decoder_width=32,
        decoder_depth=1,
        decoder_heads=2,
        checkpoint_every=3,
        val_every=3,
        val_images=4,
        val_fraction=0.2,
        preview_every=3,
        workers=0,
        hflip=0.0,
        quiet=True,
    )
    return TrainConfig(**{**values, **changes})


def test_a_run_exports_an_aimv2_trunk_and_keeps_its_tokenizer(data, tmp_path):
    result = train(config(data, tmp_path))
    assert result.step == 6 and np.isfinite(result.final_loss)
    trunk = mlx_aim.load(str(tmp_path))
    assert trunk.args.model_type == "aim_v2"
    assert trunk(mx.zeros((1, 16, 16, 3))).shape == (1, 16, 32)
    tokenizer = CaptionTokenizer.load(tmp_path / "tokenizer.json")
    assert tokenizer.decode(tokenizer.encode(["a red square"])[0]) == "a red square"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    for split in ("train", "val"):
        last = [r for r in records if r["split"] == split][-1]
        assert last["loss"] == pytest.approx(last["text_loss"] + 0.4 * last["image_loss"], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "previews").iterdir())[-1] == "step-00000006.png"


def test_a_resumed_run_continues_bit_for_bit(data, tmp_path):
    train(config(data, tmp_path))
    checkpoints = tmp_path / "checkpoints"
    reference = {
        name: mx.load(str(checkpoints / "step-00000006" / name))
        for name in ("model.safetensors", "optimizer.safetensors")
    }
    shutil.rmtree(checkpoints / "step-00000006")  # as if the run had stopped after step 3
    result = train(config(data, tmp_path))
    assert result.resumed_from == 3
    for name, arrays in reference.items():
        resumed = mx.load(str(checkpoints / "step-00000006" / name))
        assert resumed.keys() == arrays.keys()
        assert all(mx.array_equal(resumed[k], arrays[k]) for k in arrays), name
    with pytest.raises(InputError, match="holds a run with --vocab-size 300"):
        train(config(data, tmp_path, steps=8, vocab_size=290))  # the tokenizer cannot change


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "aim-nano"}, "--objective aimv2 trains an AIMv2 trunk: aimv2-nano"),
        ({"objective": "aimv3"}, "--objective must be one of aimv1, aimv2"),
        ({"decoder_heads": 0}, r"--decoder-heads must be in \[1, "),
        ({"decoder_heads": 5}, "divisible"),
        ({"vocab_size": 10}, "--vocab-size must be at least 259"),
        ({"patch_order": "spiral"}, "--patch-order: AIMv1-objective switches"),
    ],
)
def test_unusable_settings_name_the_flag(data, tmp_path, changes, message):
    with pytest.raises(InputError, match=message):
        train(config(data, tmp_path, **changes))


def test_previews_show_greedy_captions_next_to_the_true_ones(data, tmp_path, monkeypatch):
    from mlx_aim.train import evaluation

    drawn = []
    original = evaluation.preview_image
    monkeypatch.setattr(
        evaluation, "preview_image", lambda *a, **k: drawn.append(k) or original(*a, **k)
    )
    train(config(data, tmp_path))
    assert drawn and all(len(k["captions"]) == 4 for k in drawn)  # preview_images rows
    for caption in drawn[-1]["captions"]:
        generated, truth = caption.split("\n")
        assert truth.removeprefix("truth: ") in {f"a {c} square" for c in COLOURS}
    assert "AIMv2 objective" in drawn[-1]["title"]


def test_a_stop_signal_during_the_caption_scan_ends_the_run_at_once(data, tmp_path, monkeypatch):
    finished = []
    real_find_images = captions_module.find_images

    def slow_scan(folder):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(600):  # a scan that would go on for a minute
            time.sleep(0.1)
        finished.append(True)
        return real_find_images(folder)

    monkeypatch.setattr(captions_module, "find_images", slow_scan)
    with pytest.raises(Interrupted) as stopped:
        train(config(data, tmp_path))
    assert stopped.value.exit_code == 143 and not finished


def test_a_stop_signal_during_tokenizer_training_ends_the_run_at_once(data, tmp_path, monkeypatch):
    finished, released = [], threading.Event()

    def blocking_training(tokenizer, captions, trainer):  # as the library's does: no signals
        os.kill(os.getpid(), signal.SIGINT)
        released.wait(60)
        finished.append(True)

    monkeypatch.setattr(caption_bpe, "_learn", blocking_training)
    try:
        with pytest.raises(Interrupted) as stopped:
            train(config(data, tmp_path))
        assert stopped.value.exit_code == 130 and not finished
    finally:
        released.set()


def captioned_folder(root: Path, n: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = list(COLOURS)[i % 3]
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {name} square")
    return root


def write_shard(path: Path, folder: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        for file in sorted(folder.iterdir()):
            tar.add(file, arcname=f"k/{file.name}")
    return path


def swap_two_token_ids(tokenizer_file: Path) -> None:
    saved = json.loads(tokenizer_file.read_text())
    vocab = saved["model"]["vocab"]
    first, second = (t for t, i in vocab.items() if i in (100, 101))
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_file.write_text(json.dumps(saved))


def prepare_change(kind: str, root: Path) -> tuple[str, Callable[[Path], None]]:
    """``--data`` for a run of kind ``kind`` and a change to make to it (given the output)."""
    images = captioned_folder(root / "images")
    if kind == "sidecar caption":
        return str(images), lambda out: (images / "03.txt").write_text("a purple square")
    if kind == "tokenizer":
        return str(images), lambda out: swap_two_token_ids(out / "tokenizer.json")
    if kind == "shard":
        shard = write_shard(root / "000.tar", images)
        other = captioned_folder(root / "other", seed=1)  # same member names, other images
        return str(shard), lambda out: write_shard(shard, other)
    rows = [{"image": f"images/{i:02d}.png", "caption": f"caption {i}"} for i in range(10)]
    listing = root / "list.jsonl"
    listing.write_text("\n".join(json.dumps(r) for r in rows))
    rows[3]["caption"] = "another caption"
    return str(listing), lambda out: listing.write_text("\n".join(json.dumps(r) for r in rows))


@pytest.mark.parametrize("kind", ["sidecar caption", "tokenizer", "shard", "jsonl"])
def test_resume_refuses_a_change_to_what_the_run_trains_on(data, tmp_path, kind):
    source, change = prepare_change(kind, tmp_path / "data")
    output = tmp_path / "run"

    def on_source(**changes) -> TrainConfig:
        return dataclasses.replace(config(data, output, preview_every=0, **changes), data=source)

    train(on_source(steps=3))
    change(output)
    with pytest.raises(InputError, match=r"the training files changed since .* \(1 modified\)"):
        train(on_source())
    resumed = train(on_source(allow_data_change=True))
    assert resumed.resumed_from == 3 and resumed.step == 6


def test_a_run_recorded_before_caption_fingerprints_still_resumes(data, tmp_path):
    train(config(data, tmp_path, steps=3, preview_every=0))
    step = tmp_path / "checkpoints" / "step-00000003"
    listing = json.loads((step / "data.json").read_text())
    (step / "data.json").write_text(json.dumps({"files": listing["files"]}))
    integrity = json.loads((step / "checkpoint.json").read_text())
    integrity["files"]["data.json"] = {
        "size": (step / "data.json").stat().st_size,
        "sha256": hashlib.sha256((step / "data.json").read_bytes()).hexdigest(),
    }
    (step / "checkpoint.json").write_text(json.dumps(integrity))
    assert train(config(data, tmp_path, preview_every=0)).resumed_from == 3
