"""The caption tokenizer of AIMv2 pre-training: byte-level BPE with [PAD], [BOS] and [EOS].

A run trains one on its training captions (``CaptionTokenizer.train``, the ``tokenizers``
library's BPE trainer over bytes, so any text encodes) or loads a ``tokenizer.json``
(``CaptionTokenizer.load``) that defines the three special tokens, and keeps it as
``tokenizer.json`` in the run directory. ``tokenizers`` is a core dependency.

Training sees each caption cut to ``MAX_CAPTION_CHARS`` (BPE training slows down sharply with the
length of one caption) and runs in a worker thread, so that a stop signal handled in the main
thread ends the wait at once (the library's training does not look at signals).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.captions import MAX_CAPTION_CHARS
from ..errors import InputError
from ..io import read_text, write_text
from ..objectives.multimodal import caption_sequences

PAD, BOS, EOS = "[PAD]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, BOS, EOS)
TOKENIZER_FILE = "tokenizer.json"
# Text every usable caption tokenizer encodes to at least one token.
PROBE_TEXT = "a photo of a red square, 2 blue circles."


def check_vocabulary(vocab: dict[str, int], vocab_size: int, source: str, what: str) -> None:
    """InputError naming ``source`` unless every id of ``vocab`` is in ``[0, vocab_size)``."""
    if not vocab:
        raise InputError(f"{source}: an empty vocabulary")
    token, top = max(vocab.items(), key=lambda item: item[1])
    low_token, low = min(vocab.items(), key=lambda item: item[1])
    if low < 0:
        raise InputError(f"{source}: token {low_token!r} has a negative id ({low})")
    if top >= vocab_size:
        raise InputError(
            f"{source}: token {token!r} has id {top}, not below {what} ({vocab_size}); the "
            "tokenizer does not match the model"
        )


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ModuleNotFoundError:
        raise InputError("captions need the 'tokenizers' package: pip install tokenizers") from None
    return tokenizers


def _learn(tokenizer: Any, captions: Sequence[str], trainer: Any) -> None:
    tokenizer.train_from_iterator(captions, trainer=trainer, length=len(captions))


def _in_worker(work: Any) -> None:
    """Run ``work()`` in a daemon thread while the main thread waits, able to handle signals.

    An exception from a signal handler (``Interrupted``, ``KeyboardInterrupt``) ends the wait and
    leaves the thread behind; an exception of ``work`` is raised here.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # handed to the waiting thread
            failure.append(e)

    worker = threading.Thread(target=run, name="caption-bpe", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if failure:
        raise failure[0]


class CaptionTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids of [PAD], [BOS] and [EOS].

    Refused (InputError naming ``source``): a special token missing, two of them sharing an id,
    an id at or above the vocabulary size (the model's embedding rows), or a tokenizer that cannot
    encode text or encodes it to nothing.
    """

    def __init__(self, tokenizer: Any, source: str = "tokenizer"):
        self.source = source
        ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids, strict=True) if i is None]
        if missing:
            raise InputError(f"{source}: no special token(s) {', '.join(missing)}")
        if len(set(ids)) < len(ids):
            shown = ", ".join(f"{t} = {i}" for t, i in zip(SPECIAL_TOKENS, ids, strict=True))
            raise InputError(f"{source}: [PAD], [BOS] and [EOS] must be different tokens ({shown})")
        self.tokenizer = tokenizer
        self.pad, self.bos, self.eos = ids
        self.check_ids(self.vocab_size, "its vocabulary size")
        if not self.encode([PROBE_TEXT])[0]:
            raise InputError(f"{source}: encodes text to no tokens (an empty vocabulary?)")

    def check_ids(self, vocab_size: int, what: str = "the model's vocabulary size") -> None:
        """Refuse token ids the model cannot embed: every id, special ones included, must lie in
        ``[0, vocab_size)``."""
        check_vocabulary(
            self.tokenizer.get_vocab(with_added_tokens=True), vocab_size, self.source, what
        )

    @classmethod
    def train(cls, captions: Sequence[str], vocab_size: int) -> CaptionTokenizer:
        """Byte-level BPE of at most ``vocab_size`` tokens (the 3 special ones first) on ``captions``."""
        tk = _tokenizers()
        alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
            raise InputError(
                f"--vocab-size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} (the 256 "
                f"bytes and 3 special tokens), got {vocab_size}"
            )
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=alphabet,
            show_progress=False,
        )
        _in_worker(lambda: _learn(tokenizer, [c[:MAX_CAPTION_CHARS] for c in captions], trainer))
        return cls(tokenizer, "trained tokenizer")

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        """A tokenizer saved as ``tokenizer.json``; InputError naming the file if unusable."""
        tk = _tokenizers()
        try:
            tokenizer = tk.Tokenizer.from_str(read_text(path))
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            if isinstance(e, InputError):
                raise
            raise InputError(f"{path}: not a tokenizers tokenizer.json ({e})") from None
        return cls(tokenizer, str(path))

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` atomically."""
        write_text(path, self.tokenizer.to_str(pretty=True))

    @property
    def fingerprint(self) -> str:
        """A digest of the whole tokenizer (vocabulary, merges, settings)."""
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption, without special tokens."""
        try:
            encodings = self.tokenizer.encode_batch(list(captions), add_special_tokens=False)
        except Exception as e:  # the library raises bare Exceptions (a WordLevel without [UNK])
            raise InputError(f"{self.source}: cannot encode text ({e})") from None
        return [e.ids for e in encodings]

    def sequences(self, captions: Sequence[str], max_text_tokens: int) -> np.ndarray:
        """``[BOS] caption [EOS]`` rows, cut or padded to ``max_text_tokens + 1``: int32 (N, T+1)."""
        return caption_sequences(
            self.encode(captions), max_text_tokens, self.bos, self.eos, self.pad
        )

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids; special tokens are dropped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
