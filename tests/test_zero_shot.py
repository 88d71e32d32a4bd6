"""Zero-shot classification and text embeddings with a tiny random LiT model and a local vocab."""

import csv
import json
import math
import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest
from clip_vocab import write_clip_vocab
from image_corpus import make_corpus, noise
from mlx_aim_cli.main import app
from parity import assert_parity
from typer.testing import CliRunner

import mlx_aim
from mlx_aim.checkpoints.registry import aim_v2_preprocessing
from mlx_aim.checkpoints.weights import save_model
from mlx_aim.models import build_model
from mlx_aim.models.aim_v2_lit import l2_normalize
from mlx_aim.tasks.embed import embed_images, embed_texts, load_embeddings
from mlx_aim.tasks.features import preprocess
from mlx_aim.tasks.zero_shot import ZeroShotClassifier, imagenet_templates, label_embeddings
from mlx_aim.text.clip_tokenizer import copy_tokenizer_files, load_tokenizer

pytest.importorskip("tokenizers")

LABELS = ["cat", "dog", "car", "origami plane"]


def lit_config(vocab_size: int) -> dict:
    return {
        "model_type": "aim_v2_lit",
        "vision": {
            "model_type": "aim_v2",
            "image_size": 28,
            "patch_size": 14,
            "embed_dim": 32,
            "num_blocks": 1,
            "num_heads": 2,
            "mlp_hidden_dim": 48,
        },
        "text_embed_dim": 24,
        "text_num_blocks": 2,
        "text_num_heads": 2,
        "text_mlp_hidden_dim": 40,
        "vocab_size": vocab_size,
        "eos_token_id": vocab_size - 1,
        "projection_dim": 16,
        "max_logit_scale": 100.0,
    }


@pytest.fixture(scope="module")
def lit_dir(tmp_path_factory):
    """A saved tiny LiT model with the test vocabulary's tokenizer files beside it."""
    vocab = write_clip_vocab(tmp_path_factory.mktemp("vocab"))
    size = load_tokenizer(vocab).vocab_size
    mx.random.seed(0)
    model = build_model(lit_config(size))
    folder = save_model(
        model, tmp_path_factory.mktemp("m") / "lit", preprocessing=aim_v2_preprocessing(28)
    )
    copy_tokenizer_files(vocab, folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = [root / f"img{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        noise(30 + 7 * i, 28 + 5 * i, seed=i).save(path)
    return paths


def test_load_attaches_the_tokenizer_of_the_model_folder(lit_dir):
    model = mlx_aim.load(lit_dir)
    ids = model.tokenizer(["a photo of a cat."])
    assert ids[0, 0].item() == model.tokenizer.backend.token_to_id("<|startoftext|>")
    assert model.tokenizer.eos_id == model.args.eos_token_id


def test_text_embeddings_are_encode_text_of_the_tokens(lit_dir):
    model = mlx_aim.load(lit_dir)
    texts = ["a photo of a cat.", "A DOG!", "an origami plane " * 30]
    expected = np.array(model.encode_text(model.tokenizer(texts)))
    assert_parity(embed_texts(model, texts, batch_size=2), expected)  # batches of 2 vs one of 3
    unit = embed_texts(model, texts, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)


def test_probabilities_are_the_softmax_of_scaled_cosines(lit_dir, images):
    model = mlx_aim.load(lit_dir)
    model.log_logit_scale = mx.array(2.0)
    classifier = ZeroShotClassifier(model, LABELS)
    probs = classifier(images)
    prompts = [f"a photo of a {label}." for label in LABELS]
    text = l2_normalize(model.encode_text(model.tokenizer(prompts)))
    image = l2_normalize(model.encode_image(preprocess(model, images)))
    expected = np.array(mx.softmax(math.exp(2.0) * image @ text.T, axis=-1))
    np.testing.assert_allclose(probs, expected, rtol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    top = classifier.top_k(probs, k=2)
    for row, best in zip(probs, top, strict=True):
        assert [label for label, _ in best] == [LABELS[j] for j in np.argsort(-row)[:2]]


def test_template_ensemble_averages_unit_prompt_embeddings(lit_dir):
    model = mlx_aim.load(lit_dir)
    templates = imagenet_templates()
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    ensemble = label_embeddings(model, ["dog"], templates)[0]
    prompts = embed_texts(model, [t.format("dog") for t in templates], normalize=True)
    expected = prompts.mean(axis=0) / np.linalg.norm(prompts.mean(axis=0))
    np.testing.assert_allclose(ensemble, expected, rtol=1e-5)
    single = label_embeddings(model, ["dog"], ["a photo of a {}."])[0]
    assert not np.allclose(ensemble, single, atol=1e-3)


@pytest.mark.parametrize(
    ("labels", "templates", "message"),
    [
        (["cat", "cat"], ["{}"], "more than once: cat"),
        (["cat", " "], ["{}"], "no empty one"),
        (["cat"], ["a photo"], "exactly one {}"),
    ],
)
def test_bad_labels_and_templates_are_named(lit_dir, labels, templates, message):
    with pytest.raises(ValueError, match=message):
        label_embeddings(mlx_aim.load(lit_dir), labels, templates)


def run(args, **kwargs):
    return CliRunner().invoke(app, [*map(str, args)], **kwargs)


def test_cli_prints_top_k_and_writes_jsonl_and_csv(lit_dir, images, tmp_path):
    model = mlx_aim.load(lit_dir)
    expected = ZeroShotClassifier(model, LABELS).top_k(ZeroShotClassifier(model, LABELS)(images), 2)
    labels = ",".join(LABELS)
    result = run(["zero-shot", *images, "--model", lit_dir, "--labels", labels, "-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert [line.split("  ")[0] for line in lines] == [str(p) for p in images]
    assert lines[0].split("  ")[1].startswith(expected[0][0][0])

    out = tmp_path / "top.jsonl"
    result = run(["zero-shot", *images, "-m", lit_dir, "-l", labels, "-k", "2", "-o", out])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in images]
    for row, best in zip(rows, expected, strict=True):
        assert row["labels"] == [label for label, _ in best]
        np.testing.assert_allclose(row["probs"], [p for _, p in best], rtol=1e-5)

    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(LABELS) + "\n\n")
    out = tmp_path / "top.csv"
    result = run(["zero-shot", images[0], "-m", lit_dir, "--labels-file", labels_file, "-o", out])
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(out.open()))
    assert [r["rank"] for r in table] == ["1", "2", "3", "4"]
    assert sorted(r["label"] for r in table) == sorted(LABELS)
    assert sum(float(r["probability"]) for r in table) == pytest.approx(1.0, abs=1e-5)


def test_cli_imagenet_templates_and_json(lit_dir, images):
    args = ["zero-shot", images[1], "-m", lit_dir, "-l", "cat,dog", "--templates", "imagenet"]
    result = run([*args, "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    model = mlx_aim.load(lit_dir)
    classifier = ZeroShotClassifier(model, ["cat", "dog"], imagenet_templates())
    (best,) = classifier.top_k(classifier([images[1]]), 2)
    assert row["labels"] == [label for label, _ in best]


def test_cli_skips_bad_files_with_exit_code_4(lit_dir, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    result = run(["zero-shot", tmp_path / "corpus", "-m", lit_dir, "-l", "cat,dog", "--json"])
    assert result.exit_code == 4, result.output
    assert len(result.stdout.strip().splitlines()) == len(corpus["good"])
    for bad in corpus["bad"]:
        assert f"skipped {bad}:" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give the labels"),
        (["-l", "cat,cat"], "more than once"),
        (["-l", "cat", "--template", "no slot"], "exactly one {}"),
        (["-l", "cat", "--templates", "cifar"], "unknown template set"),
        (["-l", "cat", "-o", "top.npy"], "unknown output format"),
    ],
)
def test_cli_bad_options_are_one_line_with_exit_code_1(lit_dir, images, args, message):
    result = run(["zero-shot", images[0], "-m", lit_dir, *args])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_cli_needs_a_text_tower_and_its_tokenizer(lit_dir, images, tmp_path):
    vision = save_model(build_model(lit_config(10)["vision"]), tmp_path / "vision")
    result = run(["zero-shot", images[0], "-m", vision, "-l", "cat"])
    assert result.exit_code == 1 and "has no text tower" in result.stderr
    bare = save_model(mlx_aim.load(lit_dir), tmp_path / "bare")  # no tokenizer files
    result = run(["zero-shot", images[0], "-m", bare, "-l", "cat"])
    assert result.exit_code == 1 and "has no tokenizer" in result.stderr


def test_embed_text_writes_text_embeddings(lit_dir, tmp_path):
    texts = ["a photo of a cat.", "a photo of a dog."]
    text_file = tmp_path / "texts.txt"
    text_file.write_text(texts[1] + "\n")
    out = tmp_path / "t.npy"
    args = ["embed", "--text", texts[0], "--text-file", text_file, "-m", lit_dir, "--normalize"]
    result = run([*args, "-o", out])
    assert result.exit_code == 0, result.output
    embeddings, names = load_embeddings(out)
    assert names == texts
    expected = embed_texts(mlx_aim.load(lit_dir), texts, normalize=True)
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5)

    result = run(["embed", "--text", texts[0], "-m", lit_dir, "--json"])
    assert json.loads(result.stdout)["text"] == texts[0]


def test_embed_refuses_images_and_text_together(lit_dir, images):
    result = run(["embed", images[0], "--text", "a cat", "-m", lit_dir])
    assert result.exit_code == 1 and "not both" in result.stderr
    result = run(["embed", "-m", lit_dir])
    assert result.exit_code == 1 and "give image paths" in result.stderr


def test_lit_image_embeddings_default_to_the_shared_space(lit_dir, images):
    model = mlx_aim.load(lit_dir)
    expected = np.array(model.encode_image(preprocess(model, images)))
    np.testing.assert_allclose(embed_images(model, images), expected, rtol=1e-5, atol=1e-6)


def test_missing_tokenizers_package_is_one_line(lit_dir, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` fails
    assert mlx_aim.load(lit_dir).tokenizer is None
    result = run(["zero-shot", images[0], "-m", lit_dir, "-l", "cat"])
    assert result.exit_code == 1 and "pip install tokenizers" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_embed_text_with_a_vision_model_is_one_line(images, tmp_path):
    vision = save_model(build_model(lit_config(10)["vision"]), tmp_path / "vision")
    result = run(["embed", "--text", "a cat", "-m", vision])
    assert result.exit_code == 1 and "has no text tower" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_converting_a_lit_model_without_tokenizer_files_says_zero_shot_will_need_them(
    lit_dir, tmp_path
):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "preprocess.json"):
        shutil.copy(lit_dir / name, bare / name)
    result = run(["convert", bare, tmp_path / "out"])
    assert result.exit_code == 0
    assert "no tokenizer files" in result.stderr and "zero-shot" in result.stderr

    result = run(["convert", lit_dir, tmp_path / "with-tokenizer"])
    assert result.exit_code == 0 and "tokenizer" not in result.stderr


def test_zero_shot_never_writes_into_the_model_it_reads(lit_dir, images, tmp_path):
    before = {p: p.read_bytes() for p in lit_dir.iterdir()}
    labels = tmp_path / "labels.csv"
    labels.write_text("cat\ndog\n")
    for target in (lit_dir / "top.csv", lit_dir / "new" / "top.jsonl", labels):
        args = [images[0], "-m", lit_dir, "--labels-file", labels, "-o", target, "--force"]
        result = run(["zero-shot", *args])
        assert result.exit_code == 3, result.output
        assert "which this command reads" in result.stderr
    assert {p: p.read_bytes() for p in lit_dir.iterdir()} == before
    assert labels.read_text() == "cat\ndog\n"


def test_embed_text_without_model_uses_the_released_lit_model_not_the_vision_default(
    lit_dir, monkeypatch
):
    from mlx_aim.tasks.config import EmbedConfig

    assert EmbedConfig().model == "aimv2-large-patch14-224"
    assert EmbedConfig(text=["a cat"]).model == "aimv2-large-patch14-224-lit"
    loaded = []
    real_load = mlx_aim.load
    monkeypatch.setattr(
        mlx_aim, "load", lambda name, **kw: loaded.append(name) or real_load(lit_dir)
    )
    result = run(["embed", "--text", "a cat", "--json"])
    assert result.exit_code == 0, result.output
    assert loaded == ["aimv2-large-patch14-224-lit"]
