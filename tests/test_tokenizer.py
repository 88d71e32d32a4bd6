"""The LiT tokenizer gives the ids of transformers' CLIPTokenizer on the same vocab/merges files."""

import json

import numpy as np
import pytest
from clip_vocab import CORPUS, write_clip_vocab

from mlx_aim.text.clip_tokenizer import CONTEXT_LENGTH, EOS, has_tokenizer, load_tokenizer

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

PIECES = [
    "a photo of a cat",
    "A PHOTO of the DOG",
    "naïve café résumé",
    "Straße ÆØÅ ĳ ﬁ",
    "数据 日本語のテキスト 한국어",
    "Привет, мир",
    "😀🐈‍⬛👍🏽 🇫🇷",
    "it's they've we'll I'M you'D isn't",
    "3.14159 and 1,000,000 or 42nd",
    "!!!??? ... --- (brackets) [x] {y} <z>",
    "tab\there\nnew line   many   spaces",
    "e\u0301 composed vs é",
    "&amp; &lt;html&gt; #hashtag @user",
    "zero\u200bwidth and\u00a0nbsp",
    "ALL CAPS SENTENCE.",
    "  leading and trailing  ",
    "",
]


def strings(count: int = 300, seed: int = 0) -> list[str]:
    """Random concatenations of the pieces (some far over the context length)."""
    rng = np.random.default_rng(seed)
    out = list(PIECES) + CORPUS
    while len(out) < count:
        k = int(rng.integers(1, 40 if len(out) % 10 == 0 else 5))
        out.append(" ".join(rng.choice(PIECES, size=k)))
    return out


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    return write_clip_vocab(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def reference(vocab_dir):
    return transformers.CLIPTokenizer.from_pretrained(str(vocab_dir))


def reference_ids(reference, texts):
    return reference(texts, padding=True, truncation=True, max_length=CONTEXT_LENGTH)["input_ids"]


def test_ids_match_clip_tokenizer(vocab_dir, reference):
    texts = strings()
    ours = load_tokenizer(vocab_dir)
    assert ours(texts).tolist() == reference_ids(reference, texts)
    assert ours.encode(texts) == [
        reference(t, truncation=True, max_length=77)["input_ids"] for t in texts
    ]


def test_truncation_keeps_the_end_token(vocab_dir):
    tokenizer = load_tokenizer(vocab_dir)
    ids = tokenizer(["a photo of a cat " * 60, "a cat"]).tolist()
    assert len(ids[0]) == CONTEXT_LENGTH and ids[0][-1] == tokenizer.eos_id
    assert ids[1].index(tokenizer.eos_id) == 3  # <|startoftext|> a cat <|endoftext|>
    assert ids[1][4:] == [tokenizer.pad_id] * (CONTEXT_LENGTH - 4)


def test_text_is_lowercased_and_whitespace_collapsed(vocab_dir):
    tokenizer = load_tokenizer(vocab_dir)
    assert tokenizer.encode("A  Photo\tOF a CAT") == tokenizer.encode("a photo of a cat")


def test_tokenizer_json_is_read_as_shipped(vocab_dir, reference, tmp_path):
    reference.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    texts = strings(60, seed=1)
    assert load_tokenizer(tmp_path)(texts).tolist() == reference_ids(reference, texts)


def test_pad_token_comes_from_the_tokenizer_config(vocab_dir, reference, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((vocab_dir / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_id == reference.convert_tokens_to_ids("!") != tokenizer.eos_id
    assert tokenizer(["a cat", "a photo of a cat"]).tolist()[0][-1] == tokenizer.pad_id


def test_missing_files_are_named(tmp_path):
    assert not has_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="vocab.json \\+ merges.txt"):
        load_tokenizer(tmp_path)


def test_end_token_is_the_vocabulary_last(vocab_dir):
    tokenizer = load_tokenizer(vocab_dir)
    assert tokenizer.eos_id == tokenizer.vocab_size - 1
    assert tokenizer.backend.id_to_token(tokenizer.eos_id) == EOS
