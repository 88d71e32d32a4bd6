"""The CLIP byte-level BPE tokenizer shipped with the AIMv2 LiT checkpoint (``tokenizers`` backend).

The checkpoint's files are read as they are: ``tokenizer.json`` when present, else ``vocab.json``
plus ``merges.txt`` assembled into the CLIP pipeline of transformers' ``CLIPTokenizer`` (the
reference of apple/ml-aim): NFC, whitespace runs to one space, lowercase; split into letters runs,
single digits, punctuation runs and contractions; byte-level BPE with ``</w>`` ending each word;
``<|startoftext|> ... <|endoftext|>``, truncated to the context length with the end token kept.

Needs the optional ``tokenizers`` package: ``pip install 'mlx-aim[text]'``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx

from ..io import write_text

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CONTEXT_LENGTH = 77
FULL_FILE = "tokenizer.json"
BPE_FILES = ("vocab.json", "merges.txt")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# CLIP's pre-tokenization: special tokens, English contractions, letter runs, single digits and
# runs of everything else that is not a space.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "text needs the tokenizers package: pip install 'mlx-aim[text]'"
        ) from None
    return tokenizers


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tokenizer: ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``."""
    directory = Path(directory)
    return (directory / FULL_FILE).is_file() or all((directory / f).is_file() for f in BPE_FILES)


def copy_tokenizer_files(source: str | Path, destination: str | Path) -> list[Path]:
    """Copy the tokenizer files found in ``source`` into ``destination``; returns the copies."""
    source, destination = Path(source), Path(destination)
    names = (FULL_FILE, *BPE_FILES, *CONFIG_FILES)
    return [
        Path(shutil.copyfile(source / name, destination / name))
        for name in names
        if (source / name).is_file()
    ]


def _clip_backend(directory: Path):
    """A ``tokenizers.Tokenizer`` with CLIP's pipeline around the vocab.json / merges.txt BPE."""
    tk = _tokenizers()
    model = tk.models.BPE.from_file(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        unk_token=EOS,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
    )
    return _with_clip_pipeline(tk.Tokenizer(model))


def train_clip_bpe(
    texts: Sequence[str], vocab_size: int, context_length: int = CONTEXT_LENGTH
) -> Tokenizer:
    """A tokenizer for a LiT text tower trained from scratch: byte-level BPE of at most
    ``vocab_size`` tokens learned from ``texts`` (lowercased, whitespace runs to one space, each
    word with its leading space as in GPT-2, so every text encodes), with CLIP's start and end
    tokens around every text. ``tokenizer.save(folder)`` writes it as ``tokenizer.json``, which
    ``load_tokenizer`` reads like a released one."""
    tk = _tokenizers()
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(
            f"the vocabulary must hold at least {len(alphabet) + 2} tokens (the 256 bytes and the "
            f"start and end tokens), got {vocab_size}"
        )
    backend = tk.Tokenizer(tk.models.BPE())
    backend.normalizer = _clip_normalizer()
    backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    _add_start_and_end(backend)
    return Tokenizer(backend, context_length)


def _clip_normalizer():
    """CLIP's text normalisation: NFC, whitespace runs to one space, lowercase."""
    tk = _tokenizers()
    return tk.normalizers.Sequence(
        [
            tk.normalizers.NFC(),
            tk.normalizers.Replace(tk.Regex(r"\s+"), " "),
            tk.normalizers.Lowercase(),
        ]
    )


def _add_start_and_end(backend) -> None:
    """Put ``<|startoftext|>`` and ``<|endoftext|>`` around every text ``backend`` encodes."""
    tk = _tokenizers()
    backend.add_special_tokens([BOS, EOS])
    backend.post_processor = tk.processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, backend.token_to_id(BOS)), (EOS, backend.token_to_id(EOS))],
    )


def _with_clip_pipeline(backend):
    """``backend`` with CLIP's normalizer, pre-tokenizer and start and end tokens."""
    tk = _tokenizers()
    backend.normalizer = _clip_normalizer()
    backend.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(CLIP_PATTERN), behavior="removed", invert=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    _add_start_and_end(backend)
    return backend


def _pad_token(directory: Path) -> str:
    """The pad token named by the checkpoint's tokenizer config, else the end-of-text token."""
    for name in CONFIG_FILES:
        file = directory / name
        if file.is_file():
            pad = json.loads(file.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return EOS


class Tokenizer:
    """Strings to the token ids the LiT text tower reads.

    ``tokenizer(texts)`` returns int32 ids (B, L), each row ``<|startoftext|> ... <|endoftext|>``
    truncated to ``context_length`` with the end token kept, padded with the pad id to the longest
    row (as transformers' ``CLIPTokenizer(texts, padding=True, truncation=True)``).
    """

    def __init__(self, backend, context_length: int = CONTEXT_LENGTH, pad_token: str = EOS):
        self.backend = backend
        self.context_length = context_length
        self.eos_id = self._id(EOS)
        self.pad_id = self._id(pad_token)
        backend.no_padding()
        backend.enable_truncation(context_length)

    def _id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer's vocabulary has no {token!r}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, texts: str | Sequence[str]) -> list[list[int]]:
        """Ids of each text, truncated, unpadded."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return [e.ids for e in self.backend.encode_batch(texts)]

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` into ``directory`` atomically."""
        write_text(Path(directory) / FULL_FILE, self.backend.to_str(pretty=True))

    def __call__(self, texts: str | Sequence[str]) -> mx.array:
        rows = self.encode(texts)
        length = max((len(r) for r in rows), default=0)
        return mx.array([r + [self.pad_id] * (length - len(r)) for r in rows], dtype=mx.int32)


def load_tokenizer(directory: str | Path, context_length: int = CONTEXT_LENGTH) -> Tokenizer:
    """The tokenizer stored in ``directory`` (see the module docstring for the files read)."""
    directory = Path(directory)
    if (directory / FULL_FILE).is_file():
        backend = _tokenizers().Tokenizer.from_file(str(directory / FULL_FILE))
    elif has_tokenizer(directory):
        backend = _clip_backend(directory)
    else:
        raise FileNotFoundError(
            f"{directory}: no tokenizer files ({FULL_FILE}, or {' + '.join(BPE_FILES)})"
        )
    try:
        return Tokenizer(backend, context_length, _pad_token(directory))
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None


def model_tokenizer(model) -> Tokenizer:
    """``model.tokenizer``, or an error saying what is missing: the package or the files."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        _tokenizers()  # names the optional package when it is the missing piece
        raise FileNotFoundError(
            f"the model has no tokenizer: its folder lacks {FULL_FILE} (or "
            f"{' + '.join(BPE_FILES)}); load the released LiT model by name, or copy those files "
            "from its Hugging Face repo beside the weights"
        )
    return tokenizer
