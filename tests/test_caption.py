"""Captioning with an AIMv2 pre-training run (mlx_aim/tasks/caption.py, ``mlx-aim caption``)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_AIMV2_TRUNK
from mlx_aim_cli.main import app
from PIL import Image
from typer.testing import CliRunner

from mlx_aim.errors import InputError
from mlx_aim.models import build_model
from mlx_aim.tasks.caption import Captioner, CaptionScores, score_captions
from mlx_aim.text.caption_bpe import CaptionTokenizer
from mlx_aim.train import TrainConfig, train
from mlx_aim.train.multimodal_step import make_multimodal_train_step
from mlx_aim.train.optim import build_optimizer, warmup_cosine

pytest.importorskip("tokenizers")

TRUNK = TINY_AIMV2_TRUNK
CAPTIONS = {"red": "a red square", "green": "one green circle", "blue": "two blue shapes"}
COLOURS = {"red": (1.5, -1, -1), "green": (-1, 1.5, -1), "blue": (-1, -1, 1.5)}


@pytest.fixture(scope="module")
def overfit():
    """A tiny AIMv2 model trained to caption three coloured images: (captioner, images)."""
    tokenizer = CaptionTokenizer.train(list(CAPTIONS.values()) * 10, vocab_size=280)
    config = {"model_type": "aimv2_pretrain", "encoder": TRUNK, "vocab_size": tokenizer.vocab_size}
    config |= {"max_text_tokens": 8, "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}
    mx.random.seed(0)
    model = build_model(config)
    optimizer = build_optimizer(model, warmup_cosine(3e-3, 5, 150, 1e-4), weight_decay=0.0)
    step = make_multimodal_train_step(model, optimizer, pad=tokenizer.pad)
    rng = np.random.default_rng(0)
    images = np.array([np.full((16, 16, 3), c) for c in COLOURS.values()], np.float32)
    images = mx.array(images + 0.2 * rng.normal(size=images.shape).astype(np.float32))
    sequences = mx.array(tokenizer.sequences(list(CAPTIONS.values()), 8))
    for _ in range(150):
        step([(images, sequences)])
    return Captioner(model, tokenizer, preprocess=None), images


def test_greedy_decoding_recovers_the_captions_of_an_overfit_model(overfit):
    captioner, images = overfit
    tokenizer = captioner.tokenizer
    assert captioner.generate(images) == list(CAPTIONS.values())
    first_two = [tokenizer.decode(ids[:2]) for ids in tokenizer.encode(list(CAPTIONS.values()))]
    assert captioner.generate(images, max_tokens=2) == first_two
    sampled = captioner.generate(images, temperature=1.0, key=mx.random.key(3))
    assert sampled == captioner.generate(images, temperature=1.0, key=mx.random.key(3))


def test_scores_count_exact_captions_and_teacher_forced_tokens(overfit):
    captioner, images = overfit
    truth = list(CAPTIONS.values())
    target_tokens = sum(len(ids) + 1 for ids in captioner.tokenizer.encode(truth))  # + [EOS]
    perfect = score_captions(captioner, images, [f"  {c} " for c in truth], batch_size=2)
    assert perfect == CaptionScores(3, 1.0, 1.0, target_tokens)

    wrong = truth[:2] + ["two blue squares"]
    scores = score_captions(captioner, images, wrong, batch_size=2)
    assert scores.exact_match == pytest.approx(2 / 3)
    # a caption longer than the decoder's 8 text positions is cut (and loses its [EOS])
    assert scores.tokens == sum(min(len(ids) + 1, 8) for ids in captioner.tokenizer.encode(wrong))
    assert scores.token_accuracy < 1.0
    with pytest.raises(InputError, match="3 images but 2 reference captions"):
        score_captions(captioner, images, truth[:2])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step aimv2 run on six captioned images, and one unreadable image file."""
    root = tmp_path_factory.mktemp("caption")
    (root / "tiny.json").write_text(json.dumps(TRUNK))
    (root / "images").mkdir()
    for i, name in enumerate(list(CAPTIONS) * 2):
        pixels = np.full((16, 16, 3), [int(128 + 80 * c) for c in COLOURS[name]], np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text(CAPTIONS[name])
    (root / "broken.png").write_bytes(b"not a png")
    values = dict(objective="aimv2", model=str(root / "tiny.json"), data=str(root / "images"))
    values |= dict(output=str(root / "run"), steps=2, batch_size=2, vocab_size=280, workers=0)
    values |= dict(decoder_width=32, decoder_depth=1, decoder_heads=2, val_fraction=0.0)
    train(TrainConfig(**values, preview_every=0, quiet=True))
    return root


def test_the_command_writes_jsonl_and_names_unreadable_files(run):
    out = run / "captions.jsonl"
    args = ["caption", str(run / "images"), str(run / "broken.png"), "-m", str(run / "run")]
    result = CliRunner().invoke(app, [*args, "-o", str(out), "--max-tokens", "3"])
    assert result.exit_code == 4, result.output
    assert "broken.png" in result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == [str(run / "images" / f"{i}.png") for i in range(6)]
    assert all(isinstance(r["caption"], str) for r in records)
    again = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert again.exit_code == 3 and "already exists" in again.output


def test_a_run_of_another_kind_is_refused(run, tmp_path):
    result = CliRunner().invoke(app, ["caption", str(run / "images"), "-m", str(tmp_path)])
    assert result.exit_code == 1
    assert "not an `mlx-aim train --objective aimv2` output directory" in result.output
