"""``mlx-aim train --objective aimv2``: captioned data in, an ordinary AIMv2 trunk out."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_AIMV2_TRUNK
from PIL import Image

import mlx_aim
from mlx_aim.errors import InputError
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
