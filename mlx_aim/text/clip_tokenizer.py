"""The CLIP byte-level BPE tokenizer shipped with the AIMv2 LiT checkpoint (``tokenizers`` backend).

The checkpoint's files are read as they are: ``tokenizer.json`` when present, else ``vocab.json``
plus ``merges.txt`` assembled into the CLIP pipeline of transformers' ``CLIPTokenizer`` (the
reference of apple/ml-aim): NFC, whitespace runs to one space, lowercase; split into letters runs,
single digits, punctuation runs and contractions; byte-level BPE with ``</w>`` ending each word;
``<|startoftext|> ... <|endoftext|>``, truncated to the context length with the end token kept.

Runs on the ``tokenizers`` package (a core dependency).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx

from ..errors import InputError
from ..io import check_regular_file, read_json, read_text, write_text
from .caption_bpe import check_vocabulary

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CONTEXT_LENGTH = 77
FULL_FILE = "tokenizer.json"
BPE_FILES = ("vocab.json", "merges.txt")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# CLIP's pre-tokenization: special tokens, English contractions, letter runs, single digits and
# runs of everything else that is not a space.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MAX_TOKENIZER_BYTES = 64 * 2**20  # tokenizer.json, vocab.json, merges.txt (CLIP's: 1-4 MB)
MAX_CONFIG_BYTES = 2**20  # tokenizer_config.json, special_tokens_map.json
PROBE_TEXT = "a photo of a cat."  # every usable tokenizer encodes it to BOS, content, EOS


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("text needs the tokenizers package: pip install tokenizers") from None
    return tokenizers


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tokenizer: ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``."""
    directory = Path(directory)
    return (directory / FULL_FILE).is_file() or all((directory / f).is_file() for f in BPE_FILES)


def copy_tokenizer_files(source: str | Path, destination: str | Path) -> list[Path]:
    """Copy the tokenizer files found in ``source`` into ``destination``; returns the copies.

    Each must be a regular file within the size limit of what :func:`load_tokenizer` reads."""
    source, destination = Path(source), Path(destination)
    limits = dict.fromkeys((FULL_FILE, *BPE_FILES), MAX_TOKENIZER_BYTES)
    limits |= dict.fromkeys(CONFIG_FILES, MAX_CONFIG_BYTES)
    found = [name for name in limits if (source / name).is_file()]
    for name in found:
        check_regular_file(source / name, limits[name])
    return [Path(shutil.copyfile(source / name, destination / name)) for name in found]


def _bpe_files(directory: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json (token -> id) and merges.txt (pairs), size-checked; InputError naming the file."""
    vocab_file, merges_file = (directory / name for name in BPE_FILES)
    vocab = read_json(vocab_file, MAX_TOKENIZER_BYTES)
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in vocab.items()
    ):
        raise InputError(f"{vocab_file}: expected a JSON object of token -> integer id")
    merges = []
    for number, line in enumerate(read_text(merges_file, MAX_TOKENIZER_BYTES).splitlines(), 1):
        if line.startswith("#version") or not line.strip():
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise InputError(f"{merges_file}:{number}: expected two tokens separated by a space")
        merges.append((pair[0], pair[1]))
    return vocab, merges


def _clip_backend(directory: Path):
    """A ``tokenizers.Tokenizer`` with CLIP's pipeline around the vocab.json / merges.txt BPE."""
    tk = _tokenizers()
    vocab, merges = _bpe_files(directory)
    try:
        model = tk.models.BPE(
            vocab,
            merges,
            unk_token=EOS,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
        )
    except Exception as e:  # the library raises bare Exceptions (a merge of unknown tokens)
        raise InputError(
            f"{directory / BPE_FILES[1]}: unusable with {BPE_FILES[0]} ({e})"
        ) from None
    backend = tk.Tokenizer(model)
    backend.normalizer = _clip_normalizer()
    backend.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(CLIP_PATTERN), behavior="removed", invert=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    _add_start_and_end(backend)
    return backend


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


def _pad_token(directory: Path) -> tuple[str, Path | None]:
    """The pad token named by the checkpoint's tokenizer config (and that file), else the
    end-of-text token."""
    for name in CONFIG_FILES:
        file = directory / name
        if file.exists():
            config = read_json(file, MAX_CONFIG_BYTES)
            if not isinstance(config, dict):
                raise InputError(f"{file}: expected a JSON object")
            pad = config.get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad, file
    return EOS, None


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

    def check(self, source: str, vocab_size: int | None = None, eos_id: int | None = None) -> None:
        """InputError naming ``source`` unless the tokenizer fits the text tower: every id below
        ``vocab_size``, the tower's ``eos_id``, and a probe text encoded to
        ``<|startoftext|> tokens... <|endoftext|>``."""
        if vocab_size is not None:
            vocab = self.backend.get_vocab(with_added_tokens=True)
            check_vocabulary(vocab, vocab_size, source, "the text tower's vocabulary size")
        if eos_id is not None and self.eos_id != eos_id:
            raise InputError(
                f"{source}: {EOS} has id {self.eos_id}, but the text tower ends texts with id "
                f"{eos_id}; the tokenizer does not match the model"
            )
        try:
            ids = self.encode(PROBE_TEXT)[0]
        except Exception as e:  # the library raises bare Exceptions
            raise InputError(f"{source}: cannot encode text ({e})") from None
        bos_id = self.backend.token_to_id(BOS)
        if len(ids) < 3 or ids[0] != bos_id or ids[-1] != self.eos_id or bos_id == self.eos_id:
            raise InputError(
                f"{source}: encodes {PROBE_TEXT!r} to {ids[:8]}, not {BOS} + tokens + {EOS}"
            )

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


def load_tokenizer(
    directory: str | Path,
    context_length: int = CONTEXT_LENGTH,
    *,
    vocab_size: int | None = None,
    eos_id: int | None = None,
) -> Tokenizer:
    """The tokenizer stored in ``directory`` (see the module docstring for the files read).

    Files are size-checked; anything malformed, or a tokenizer that does not fit a text tower of
    ``vocab_size`` tokens ending texts with ``eos_id`` (see :meth:`Tokenizer.check`), is one
    InputError naming the file.
    """
    directory = Path(directory)
    full = directory / FULL_FILE
    if full.is_file():
        try:
            backend = _tokenizers().Tokenizer.from_str(read_text(full, MAX_TOKENIZER_BYTES))
        except Exception as e:  # the library raises bare Exceptions on malformed files
            if isinstance(e, (InputError, ImportError)):
                raise
            raise InputError(f"{full}: not a tokenizers tokenizer.json ({e})") from None
        source = full
    elif has_tokenizer(directory):
        backend, source = _clip_backend(directory), directory / BPE_FILES[0]
    else:
        raise FileNotFoundError(
            f"{directory}: no tokenizer files ({FULL_FILE}, or {' + '.join(BPE_FILES)})"
        )
    pad_token, config = _pad_token(directory)
    for token, file in ((EOS, source), (pad_token, config or source)):
        if backend.token_to_id(token) is None:
            named = " (its pad_token)" if file == config else ""
            raise InputError(f"{file}: the vocabulary has no {token!r}{named}")
    tokenizer = Tokenizer(backend, context_length, pad_token)
    tokenizer.check(str(source), vocab_size, eos_id)
    return tokenizer


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
