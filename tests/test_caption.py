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
    assert [r["path"] for r in records] == [str(run / "images" / f"{i}.png") for i in range(6)]
    assert all(isinstance(r["caption"], str) for r in records)
    again = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert again.exit_code == 3 and "already exists" in again.output


def test_a_run_of_another_kind_is_refused(run, tmp_path):
    result = CliRunner().invoke(app, ["caption", str(run / "images"), "-m", str(tmp_path)])
    assert result.exit_code == 1
    assert "not an `mlx-aim train --objective aimv2` output directory" in result.output


def _files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_command_never_writes_into_the_run_it_reads(run):
    weights = next((run / "run" / "checkpoints").glob("step-*")) / "model.safetensors"
    before = _files(run / "run")
    for target in (weights, run / "run" / "tokenizer.json", run / "run" / "new.jsonl"):
        args = ["caption", str(run / "images"), "-m", str(run / "run"), "-o", str(target)]
        result = CliRunner().invoke(app, [*args, "--force"])
        assert result.exit_code == 3, result.output
        assert "which this command reads" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert _files(run / "run") == before


@pytest.mark.parametrize("temperature", ["nan", "inf", "-inf", "1e308", "-1", "101"])
def test_non_finite_or_absurd_temperatures_are_refused(run, temperature):
    args = ["caption", str(run / "images"), "-m", str(run / "run"), "-t", temperature]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "--temperature must be 0 (greedy) or in (0, 100]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout


def _damage_run_json(info):
    return {
        "model_config-a-list": {**info, "model_config": [1, 2]},
        "run-json-a-list": [info],
        "no-preprocessing": {k: v for k, v in info.items() if k != "preprocessing"},
        "disagrees-with-checkpoint": {
            **info,
            "model_config": {**info["model_config"], "decoder_width": 64, "decoder_heads": 4},
        },
    }


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("model_config-a-list", "run.json: no 'model_config' object"),
        ("run-json-a-list", "run.json: no 'model_config' object"),
        ("no-preprocessing", "run.json: no 'preprocessing' object"),
        ("disagrees-with-checkpoint", "does not match the model_config of"),
    ],
)
def test_a_damaged_run_json_is_one_line(run, tmp_path, damage, message):
    import shutil

    copy = shutil.copytree(run / "run", tmp_path / "run")
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps(_damage_run_json(info)[damage]))
    result = CliRunner().invoke(app, ["caption", str(run / "images"), "-m", str(copy)])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_tokenizer_larger_than_the_runs_decoder_is_refused(run, tmp_path):
    import shutil

    copy = shutil.copytree(run / "run", tmp_path / "run")
    tokenizer = CaptionTokenizer.load(copy / "tokenizer.json")
    tokenizer.tokenizer.add_tokens([f"extra{i}" for i in range(50)])
    tokenizer.save(copy / "tokenizer.json")
    result = CliRunner().invoke(app, ["caption", str(run / "images"), "-m", str(copy)])
    assert result.exit_code == 1, result.output
    assert str(copy / "tokenizer.json") in result.stderr and "not below the vocabulary size" in (
        result.stderr
    )


def test_empty_captions_are_printed_and_counted_in_a_warning(run, monkeypatch):
    monkeypatch.setattr(Captioner, "generate", lambda self, images, *a: [""] * len(images))
    result = CliRunner().invoke(app, ["caption", str(run / "images"), "-m", str(run / "run")])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\t\n") == 6
    assert "warning: 6 of 6 captions are empty" in result.output
