"""Settings of ``mlx-aim embed`` and ``mlx-aim zero-shot``; each field is a flag of the command.

Like ``TrainConfig`` and ``ProbeConfig``, a field carries its help text in ``metadata`` and the CLI
builds its flags from the fields (``cli/options.py``); ``metadata["flag"]`` names a flag that is
not the field's name (``as_json``: ``--json``). This module imports no MLX: the CLI reads it to
build its flags before any model code is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import check_destination, read_text

DTYPES = ("float32", "bfloat16", "float16")
POOLS = ("auto", "mean", "head", "layers", "tokens", "projection")
SLOW_ON_CPU = "on a CPU, bfloat16, float16 and --quantize run 9-15x slower than float32"
TEMPLATE = "a photo of a {}."
PATHS_HELP = (
    "Image files, folders (recursive), glob patterns, .txt path lists, or - to read paths from "
    "standard input."
)


def _setting(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")


def _check_at_least(*checks: tuple[str, int, int]) -> None:
    """Refuse the first ``(flag, value, low)`` whose value is below ``low``."""
    for flag, value, low in checks:
        if value < low:
            raise InputError(f"{flag} must be >= {low}, not {value}")


DEFAULT_MODEL = "aimv2-large-patch14-224"


@dataclass
class EmbedConfig:
    """``mlx-aim embed`` settings (all but the image paths)."""

    model: str | None = _setting(
        None,
        "A registry name, an mlx-aim model directory (convert, train or probe output) or a "
        "checkpoint file. Default: aimv2-large-patch14-224; with --text or --text-file, "
        "aimv2-large-patch14-224-lit.",
    )
    output: Path | None = _setting(
        None,
        "Write the embeddings: .npy (+ <stem>.paths.txt), .safetensors (paths in the metadata) or "
        ".jsonl. Without it a summary per image is printed.",
    )
    pool: str = _setting(
        "auto",
        "mean (of final tokens; AIMv2 default), head (the model's attention pool), layers (token "
        "mean of averaged block outputs; AIMv1 default), tokens (all patch tokens), projection "
        "(LiT: the image embedding in the text space; its default) or auto.",
    )
    tokens: bool = _setting(False, "Shorthand for --pool tokens.")
    layers: str | None = _setting(None, "Blocks for --pool layers: last, best or i,j,k.")
    normalize: bool = _setting(False, "Scale embeddings to unit norm.")
    batch_size: int = _setting(16, "Images per forward pass.")
    dtype: str = _setting("float32", f"float32, bfloat16 or float16 ({SLOW_ON_CPU}).")
    quantize: int | None = _setting(
        None,
        "Quantize the linear layers to 4 or 8 bits (mlx.nn.quantize; saves memory on Apple GPUs, "
        "slower on a CPU).",
    )
    as_json: bool = _setting(
        False, "Print one JSON object per image with the full vector.", flag="json"
    )
    workers: int = _setting(2, "Image decoding threads (0: none).")
    force: bool = _setting(False, "Replace an existing --output.")
    quiet: bool = _setting(False, "No progress bar or summary.")
    text: list[str] | None = _setting(
        None,
        "Embed this text instead of images (repeatable; LiT models). The texts take the place of "
        "the paths in the output.",
    )
    text_file: Path | None = _setting(None, "Embed each line of this file as a text (LiT models).")

    @property
    def pooling(self) -> str:
        """``--pool`` with its shorthands applied: --tokens, and --layers alone meaning layers."""
        if self.tokens:
            return "tokens"
        return "layers" if self.layers is not None and self.pool == "auto" else self.pool

    @property
    def embeds_text(self) -> bool:
        return bool(self.text) or self.text_file is not None

    def __post_init__(self) -> None:
        if self.model is None:  # texts need a text tower: the released LiT model's
            self.model = "aimv2-large-patch14-224-lit" if self.embeds_text else DEFAULT_MODEL

    def validate(self) -> EmbedConfig:
        """Raise ``InputError`` naming the first invalid setting (by its flag); return ``self``."""
        pool = self.pooling
        if pool not in POOLS:
            raise InputError(f"--pool must be one of {', '.join(POOLS)}, not {pool!r}")
        if self.layers is not None and pool != "layers":
            raise InputError(f"--layers only applies to --pool layers, not --pool {pool}")
        _check_dtype(self.dtype)
        if self.quantize is not None and self.quantize not in (4, 8):
            raise InputError(f"--quantize must be 4 or 8, not {self.quantize}")
        _check_at_least(("--batch-size", self.batch_size, 1), ("--workers", self.workers, 0))
        return self

    def check_output(self) -> None:
        """Refuse, before any work, an ``--output`` that cannot or must not be written (one over
        the model or text file being read, or an existing one without ``--force``)."""
        if self.output is None:
            return
        from .embed import output_files

        reads = [self.model, *([self.text_file] if self.text_file else [])]
        for file in output_files(self.output):
            check_destination(file, overwrite=self.force, reads=reads)

    def texts(self, paths: list[str] | None) -> list[str]:
        """``--text`` values, then the non-empty lines of ``--text-file``; refuses image paths."""
        if paths:
            raise InputError("give image paths or --text / --text-file, not both")
        lines = read_text(self.text_file).splitlines() if self.text_file is not None else []
        texts = [*(self.text or []), *(line for line in lines if line.strip())]
        if not texts:
            raise InputError("no text to embed (--text or --text-file)")
        return texts


@dataclass
class ZeroShotConfig:
    """``mlx-aim zero-shot`` settings (all but the image paths)."""

    labels: str | None = _setting(None, "Comma-separated label names, e.g. 'cat,dog,car'.")
    labels_file: Path | None = _setting(
        None,
        "A text file with one label a line (added to --labels); with --eval, lines "
        "'folder: label text' naming the label of a class folder.",
    )
    eval_dir: Path | None = _setting(
        None,
        "Measure zero-shot accuracy on labelled images: a folder with one folder per class (its "
        "name is the label, _ read as a space). Prints top-1, top-5 (more than 5 classes), "
        "per-class accuracy and the most confused pairs.",
        flag="eval",
    )
    template: str | None = _setting(
        None, f"Prompt with {{}} standing for the label (default: {TEMPLATE!r})."
    )
    templates: str | None = _setting(
        None,
        "A prompt ensemble: imagenet (CLIP's 80 ImageNet templates, averaged per label).",
    )
    top_k: int = _setting(5, "Labels shown per image.")
    model: str = _setting(
        "aimv2-large-patch14-224-lit",
        "The LiT registry name, or a LiT checkpoint directory or file.",
    )
    output: Path | None = _setting(
        None,
        "Write the top labels: .jsonl (path, labels, probs) or .csv (path, rank, label, "
        "probability).",
    )
    as_json: bool = _setting(
        False, "Print one JSON object per image (path, labels, probs).", flag="json"
    )
    batch_size: int = _setting(16, "Images per forward pass.")
    dtype: str = _setting("float32", "float32, bfloat16 or float16.")
    workers: int = _setting(2, "Image decoding threads.")
    force: bool = _setting(False, "Replace an existing --output.")
    quiet: bool = _setting(False, "No progress bar or summary.")

    def validate(self) -> ZeroShotConfig:
        """Raise ``InputError`` naming the first invalid setting (by its flag); return ``self``."""
        _check_dtype(self.dtype)
        _check_at_least(
            ("--top-k", self.top_k, 1),
            ("--batch-size", self.batch_size, 1),
            ("--workers", self.workers, 0),
        )
        return self

    def check_output(self) -> None:
        """Refuse, before any work, an ``--output`` of an unknown format, that exists, or that
        would land over the model or labels file being read."""
        if self.output is None:
            return
        from .zero_shot import prediction_format

        try:
            prediction_format(self.output)
        except ValueError as e:
            raise InputError(str(e)) from None
        reads = [self.model, *([self.labels_file] if self.labels_file else [])]
        check_destination(self.output, overwrite=self.force, reads=reads)

    def label_names(self) -> list[str]:
        """Labels from ``--labels a,b,c`` and ``--labels-file`` (one a line, blank lines
        skipped)."""
        found = [label for label in (self.labels or "").split(",") if label.strip()]
        if self.labels_file is not None:
            found += [line for line in read_text(self.labels_file).splitlines() if line.strip()]
        if not found:
            raise InputError("give the labels: --labels 'cat,dog,car' or --labels-file FILE")
        return found

    def prompts(self) -> list[str]:
        """The prompt templates: ``--template``, the ``--templates`` set, or the default."""
        if self.template is not None and self.templates is not None:
            raise InputError("give --template or --templates, not both")
        if self.templates is not None:
            from .zero_shot import template_set

            try:
                return template_set(self.templates)
            except ValueError as e:
                raise InputError(f"--templates: {e}") from None
        return [self.template if self.template is not None else TEMPLATE]
