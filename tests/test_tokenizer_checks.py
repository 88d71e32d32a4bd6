"""Hostile tokenizers: every id is checked against the model it feeds, every file is size-checked,
and anything unusable is one ``error:`` line naming the file (never a crash or a traceback)."""

import json
import shutil

import mlx.core as mx
import pytest
from clip_vocab import write_clip_vocab
from configs import TINY_AIMV2_TRUNK
from image_corpus import noise
from mlx_aim_cli.main import app
from test_zero_shot import lit_config
from typer.testing import CliRunner

import mlx_aim
from mlx_aim.checkpoints.registry import aim_v2_preprocessing
from mlx_aim.checkpoints.weights import save_model
from mlx_aim.errors import InputError
from mlx_aim.models import build_model
from mlx_aim.text.caption_bpe import CaptionTokenizer
from mlx_aim.text.clip_tokenizer import BOS, EOS

tokenizers = pytest.importorskip("tokenizers")

GIB = 2**30


def run(args):
    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """The test CLIP vocabulary: vocab.json + merges.txt (the last id is <|endoftext|>)."""
    return write_clip_vocab(tmp_path_factory.mktemp("vocab"))


def vocab_size(vocab) -> int:
    return len(json.loads((vocab / "vocab.json").read_text()))


@pytest.fixture(scope="module")
def towers(tmp_path_factory, vocab):
    """Two tiny LiT models without tokenizer files: one sized for the vocabulary, one of 300."""
    mx.random.seed(0)
    saved = {}
    for name, size in (("fits", vocab_size(vocab)), ("small", 300)):
        folder = tmp_path_factory.mktemp(name) / "lit"
        saved[name] = save_model(
            build_model(lit_config(size)), folder, preprocessing=aim_v2_preprocessing(28)
        )
    return saved


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "a.png"
    noise(30, 28).save(path)
    return path


def _edit_vocab(folder, change):
    data = json.loads((folder / "vocab.json").read_text())
    (folder / "vocab.json").write_text(json.dumps(change(data)))


def _shifted(vocab):
    return {token: i + 1 for token, i in vocab.items()}


def _eos_first(vocab):
    first = next(t for t, i in vocab.items() if i == 0)
    return {**vocab, first: vocab[EOS], EOS: 0}


def _bos_is_eos(vocab):
    return {**vocab, BOS: vocab[EOS]}


def _sparse(path, size=GIB):
    with open(path, "wb") as f:
        f.truncate(size)


def _full_tokenizer(folder, text):
    (folder / "tokenizer.json").write_text(text)


# (name, tower, how the tokenizer files are broken, the file the error must name)
HOSTILE = [
    ("tower-smaller-than-vocab", "small", lambda f: None, "vocab.json"),
    ("id-far-beyond", "fits", lambda f: _edit_vocab(f, lambda v: {**v, "zz": 5_000_001}), "vocab"),
    ("ids-shifted", "fits", lambda f: _edit_vocab(f, _shifted), "vocab.json"),
    ("negative-id", "fits", lambda f: _edit_vocab(f, lambda v: {**v, "zz": -3}), "vocab.json"),
    ("eos-not-the-towers", "fits", lambda f: _edit_vocab(f, _eos_first), "vocab.json"),
    ("bos-equals-eos", "fits", lambda f: _edit_vocab(f, _bos_is_eos), "vocab.json"),
    ("vocab-not-json", "fits", lambda f: (f / "vocab.json").write_text("{oops"), "vocab.json"),
    ("vocab-a-list", "fits", lambda f: (f / "vocab.json").write_text("[1, 2]"), "vocab.json"),
    ("vocab-nested", "fits", lambda f: (f / "vocab.json").write_text("[" * 100_000), "vocab"),
    ("vocab-sparse-1gb", "fits", lambda f: _sparse(f / "vocab.json"), "vocab.json"),
    ("merges-3-tokens", "fits", lambda f: (f / "merges.txt").write_text("a b c\n"), "merges.txt"),
    ("merges-unknown", "fits", lambda f: (f / "merges.txt").write_text("☃ ☄\n"), "merges.txt"),
    ("merges-sparse-1gb", "fits", lambda f: _sparse(f / "merges.txt"), "merges.txt"),
    ("full-not-json", "fits", lambda f: _full_tokenizer(f, '{"model": '), "tokenizer.json"),
    ("full-sparse-1gb", "fits", lambda f: _sparse(f / "tokenizer.json"), "tokenizer.json"),
    (
        "config-not-json",
        "fits",
        lambda f: (f / "tokenizer_config.json").write_text("{"),
        "tokenizer_config.json",
    ),
    (
        "config-a-string",
        "fits",
        lambda f: (f / "tokenizer_config.json").write_text('"pad"'),
        "tokenizer_config.json",
    ),
    (
        "config-sparse-1gb",
        "fits",
        lambda f: _sparse(f / "tokenizer_config.json"),
        "tokenizer_config.json",
    ),
    (
        "pad-not-in-vocab",
        "fits",
        lambda f: (f / "tokenizer_config.json").write_text('{"pad_token": "<pad>"}'),
        "tokenizer_config.json",
    ),
]


@pytest.fixture(params=HOSTILE, ids=[case[0] for case in HOSTILE])
def hostile_lit(request, towers, vocab, tmp_path):
    """A LiT folder whose tokenizer files are broken one way; (folder, the file to be named)."""
    _, tower, damage, named = request.param
    folder = shutil.copytree(towers[tower], tmp_path / "lit")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(vocab / name, folder / name)
    damage(folder)
    return folder, named


def test_a_broken_tokenizer_is_one_line_in_text_commands(hostile_lit, image):
    folder, named = hostile_lit
    for args in (["zero-shot", image, "-l", "cat,dog"], ["embed", "--text", "a cat"]):
        result = run([*args, "-m", folder])
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("error: ") and named in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_broken_tokenizer_still_embeds_images(hostile_lit, image):
    folder, _ = hostile_lit
    result = run(["embed", image, "-m", folder])
    assert result.exit_code == 0, result.output
    assert str(image) in result.stdout


def test_the_embedding_lookup_refuses_ids_past_the_vocabulary(towers):
    model = mlx_aim.load(towers["small"])
    ids = mx.array([[0, 5, 299]], dtype=mx.int32)
    assert model.encode_text(ids).shape == (1, 16)
    for bad in (300, 5_000_001, -1):
        with pytest.raises(InputError, match=r"token ids must lie in \[0, 300\)"):
            model.encode_text(mx.array([[0, bad, 299]], dtype=mx.int32))


def test_a_fitting_tokenizer_is_accepted_and_matches_the_tower(towers, vocab, tmp_path):
    folder = shutil.copytree(towers["fits"], tmp_path / "lit")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(vocab / name, folder / name)
    model = mlx_aim.load(folder)
    ids = model.tokenizer(["a photo of a cat."])
    assert ids[0, -1].item() == model.args.eos_token_id
    assert int(ids.max().item()) < model.args.vocab_size


# --- the caption tokenizer of --objective aimv2 runs -------------------------------------------


@pytest.fixture(scope="module")
def caption_tokenizer_json():
    return CaptionTokenizer.train(["a red square", "one green circle"] * 5, 280).tokenizer.to_str()


def _with_ids(text: str, ids: dict[str, int]) -> str:
    data = json.loads(text)
    data["model"]["vocab"].update(ids)
    for added in data["added_tokens"]:
        added["id"] = ids.get(added["content"], added["id"])
    return json.dumps(data)


def _empty_vocab(text: str) -> str:
    data = json.loads(text)
    data["model"]["vocab"], data["model"]["merges"] = {}, []
    return json.dumps(data)


def _word_level_without_unk(_: str) -> str:
    model = tokenizers.models.WordLevel({"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "a": 3})
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tokenizer.to_str()


CAPTION_HOSTILE = [
    ("bos-beyond-the-vocabulary", lambda t: _with_ids(t, {"[BOS]": 5_000_001}), "has id 5000001"),
    (
        "pad-bos-eos-one-id",
        lambda t: _with_ids(t, dict.fromkeys(("[PAD]", "[BOS]", "[EOS]"), 0)),
        "must be different tokens",
    ),  # fmt: skip
    ("encodes-to-nothing", _empty_vocab, "encodes text to no tokens"),
    ("word-level-without-unk", _word_level_without_unk, "cannot encode text"),
    ("not-json", lambda t: t[: len(t) // 2], "not a tokenizers tokenizer.json"),
]


@pytest.mark.parametrize(
    ("change", "message"),
    [case[1:] for case in CAPTION_HOSTILE],
    ids=[case[0] for case in CAPTION_HOSTILE],
)
def test_a_hostile_caption_tokenizer_is_refused_naming_the_file(
    caption_tokenizer_json, tmp_path, change, message
):
    path = tmp_path / "tokenizer.json"
    path.write_text(change(caption_tokenizer_json))
    with pytest.raises(InputError, match=message) as refused:
        CaptionTokenizer.load(path)
    assert str(path) in str(refused.value)


def test_a_sparse_1gb_caption_tokenizer_is_refused_unread(tmp_path):
    path = tmp_path / "tokenizer.json"
    _sparse(path)
    with pytest.raises(InputError, match="too large") as refused:
        CaptionTokenizer.load(path)
    assert str(path) in str(refused.value)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Four images with sidecar captions, and a tiny AIMv2 trunk config."""
    root = tmp_path_factory.mktemp("captioned")
    (root / "tiny.json").write_text(json.dumps(TINY_AIMV2_TRUNK))
    for i in range(4):
        noise(16, 16, seed=i).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a red square number {i}")
    return root


def aimv2_config(captioned, output, **changes):
    from mlx_aim.train import TrainConfig

    values = dict(objective="aimv2", model=str(captioned / "tiny.json"), data=str(captioned))
    values |= dict(output=str(output), steps=1, batch_size=2, vocab_size=280, workers=0)
    values |= dict(val_fraction=0.0, preview_every=0, quiet=True)
    return TrainConfig(**{**values, **changes})


def test_a_sparse_1gb_model_json_is_refused_by_aimv2_training(captioned, tmp_path):
    from mlx_aim.train import train

    model = tmp_path / "sparse.json"
    _sparse(model)
    with pytest.raises(InputError, match="too large") as refused:
        train(aimv2_config(captioned, tmp_path / "run", model=str(model)))
    assert str(model) in str(refused.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [case[1:] for case in CAPTION_HOSTILE[:4]],
    ids=[case[0] for case in CAPTION_HOSTILE[:4]],
)
def test_aimv2_training_refuses_a_hostile_tokenizer(
    captioned, caption_tokenizer_json, tmp_path, change, message
):
    from mlx_aim.train import train

    path = tmp_path / "tokenizer.json"
    path.write_text(change(caption_tokenizer_json))
    with pytest.raises(InputError, match=message):
        train(aimv2_config(captioned, tmp_path / "run", tokenizer=str(path)))
    assert not (tmp_path / "run" / "checkpoints").exists()
