"""A small CLIP-format BPE vocabulary (vocab.json + merges.txt) written by the tests, no download.

Merges are learned with ``tokenizers``' BPE trainer on a short English corpus; the vocabulary is laid
out as CLIP's: the 256 byte symbols, the same with ``</w>``, one entry per merge, then
``<|startoftext|>`` and ``<|endoftext|>`` last.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_aim.text.clip_tokenizer import BOS, CLIP_PATTERN, EOS

CORPUS = [
    "a photo of a cat.",
    "a photo of a dog, sitting on the grass.",
    "The quick brown fox jumps over the lazy dog's back!",
    "it's 2024 - isn't it? we'll see; they've gone, I'm here, you'd know.",
    "a bad photo of the large car; a close-up photo of a small bird",
    "itap of my tattoo, a rendering of an origami plane.",
]


def write_clip_vocab(folder: Path, vocab_size: int = 600) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder`` (created); returns ``folder``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learner = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    learner.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CLIP_PATTERN), "removed", invert=True), byte_level]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    learner.train_from_iterator(CORPUS * 20, trainer)
    merges = json.loads(learner.to_str())["model"]["merges"]
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
