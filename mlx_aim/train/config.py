"""``TrainConfig``: every setting of a pre-training run; its fields are the flags of ``mlx-aim train``.

Each field carries its help text and help panel in ``metadata`` (the command line is generated
from them) and a config file (TOML or YAML) uses the same names, with ``-`` or ``_``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import io
from ..data.builtin import builtin_name
from ..errors import InputError
from ..messages import plural
from ..models.base import matches_type
from ..objectives.next_patch import ATTENTIONS, TARGETS, Variant
from ..objectives.patch_order import PATCH_ORDERS, patch_order

DTYPES = ("float32", "bfloat16")
INT_MAX = 2**31 - 1  # step counts and sizes: MLX and the data loader index with 32-bit integers
SEED_MAX = 2**32 - 1
OBJECTIVES = ("aimv1", "aimv2", "lit")
# default --steps per objective: at 100 steps an aimv2-nano trunk probes below a random one on
# the scenes' shapes (docs/aimv2-default-run.md); LiT: the steps of docs/lit.md
STEPS = {"aimv1": 100, "aimv2": 300, "lit": 300}


def _opt(default: Any, help: str, panel: str = "Optimisation") -> Any:
    return field(default=default, metadata={"help": help, "panel": panel})


@dataclass
class TrainConfig:
    """Settings of a pre-training run (defaults: a few-minute run of ``aim-nano`` on digits)."""

    # data
    data: str | None = _opt(
        None,
        "Training images: a folder (searched recursively), a glob, or a .txt file listing paths; "
        "or a built-in set by name: digits, scenes (`mlx-aim datasets`). Default: digits "
        "(scenes with --objective aimv2).",
        "Data",
    )
    val_data: str | None = _opt(
        None, "Validation images (same forms as --data). Default: --val-fraction of --data.", "Data"
    )
    val_fraction: float = _opt(
        0.05, "Fraction of --data held out for validation when --val-data is not given.", "Data"
    )
    val_images: int = _opt(256, "Size of the fixed validation subset.", "Data")
    workers: int = _opt(2, "Threads decoding and augmenting images in the background.", "Data")
    min_crop_scale: float | None = _opt(
        None,
        "Smallest RandomResizedCrop area fraction, the largest being 1.0 (default 0.4; 1.0 for "
        "--objective aimv2 on the built-in scenes, whose captions name every shape).",
        "Data",
    )
    hflip: float | None = _opt(
        None,
        "Probability of a horizontal flip (default 0.5; 0 for --objective aimv2 on the built-in "
        "scenes, whose captions say left and right).",
        "Data",
    )
    # model
    model: str | None = _opt(
        None,
        "Architecture: a name from `mlx-aim models` (aim-nano, aim-tiny, ...) or a JSON model "
        "config file (an aim_pretrain config, or an aim_v1/aim_v2 trunk). Default: aim-nano, or "
        "aimv2-nano for --objective aimv2.",
        "Model",
    )
    head_blocks: int | None = _opt(
        None, "Pixel-head MLP blocks (default: the architecture's).", "Model"
    )
    head_width: int | None = _opt(None, "Pixel-head width (default: the architecture's).", "Model")
    dtype: str = _opt(
        "float32",
        "Compute dtype: float32, or bfloat16 (mixed precision: float32 master weights and "
        "optimizer state, bfloat16 forward and backward).",
        "Model",
    )
    grad_checkpoint: bool = _opt(
        False,
        "Recompute each trunk and pixel-head block in the backward pass (less memory; 1.0-1.5x "
        "the step time on a CPU).",
        "Model",
    )
    paired_prefixes: bool = _opt(
        True,
        "Draw prefix lengths in pairs (S, K - S), each uniform on 1..K-1, and run the pixel head "
        "only where the loss reads: half the head's work, same loss. --no-paired-prefixes draws "
        "every length independently and predicts every patch.",
        "Model",
    )
    # AIMv2 objective
    objective: str = _opt(
        "aimv1",
        "aimv1: next-patch prediction from the trunk (pixel MLP head). aimv2: the AIMv2 "
        "multimodal objective on image-caption pairs (a causal decoder predicts the next patch, "
        "then the caption's next token; --model aimv2-nano or aimv2-tiny; --data captioned "
        "images, default the built-in scenes; use --hflip 0 when captions say left and right). "
        "lit: LiT, a text tower trained contrastively against a frozen AIMv2 trunk (--model "
        "TRUNK) on the same captioned data; the output is a LiT model for zero-shot and "
        "embed --text.",
        "AIMv2",
    )
    alpha: float = _opt(0.4, "Weight of the image loss: L_text + alpha * L_img.", "AIMv2")
    vocab_size: int = _opt(
        1024, "Size of the byte-level BPE caption tokenizer trained on the captions.", "AIMv2"
    )
    tokenizer: str | None = _opt(
        None,
        "A tokenizer.json with [PAD], [BOS] and [EOS] to use instead of training one.",
        "AIMv2",
    )
    decoder_width: int | None = _opt(None, "Decoder width (default: the architecture's).", "AIMv2")
    decoder_depth: int | None = _opt(None, "Decoder blocks (default: the architecture's).", "AIMv2")
    decoder_heads: int | None = _opt(
        None, "Decoder attention heads (default: the architecture's).", "AIMv2"
    )
    # LiT (locked-image text tuning)
    text_init: str | None = _opt(
        None,
        "--objective lit: start the text tower, projections, logit scale and tokenizer from this "
        "LiT model (a folder or registry name, e.g. aimv2-large-patch14-224-lit); the text sizes "
        "are then its own.",
        "LiT",
    )
    text_width: int = _opt(256, "LiT text tower width.", "LiT")
    text_depth: int = _opt(4, "LiT text tower blocks.", "LiT")
    text_heads: int = _opt(4, "LiT text tower attention heads.", "LiT")
    projection_dim: int = _opt(
        256, "LiT shared embedding size (image and text projections).", "LiT"
    )
    context_length: int = _opt(32, "LiT text tokens per caption (longer ones are cut).", "LiT")
    feature_cache: bool = _opt(
        True,
        "LiT: compute the frozen trunk's tokens of every image once and keep them on disk "
        "(MLX_AIM_CACHE, default ~/.cache/mlx-aim/features), so that a step runs only the head "
        "and the text tower. --no-feature-cache runs the trunk in every step.",
        "LiT",
    )
    # objective (the paper's ablations; each default is the paper's choice)
    target: str = _opt(
        "norm-pixels",
        "Next-patch targets: norm-pixels (each patch normalized by its own mean and variance) or "
        "pixels (raw).",
        "Objective",
    )
    attention: str = _opt(
        "prefix",
        "Trunk attention in pre-training: prefix (causal after a random bidirectional prefix) or "
        "causal (no prefix; the loss reads every next-patch prediction, and the pixel head runs "
        "at every position).",
        "Objective",
    )
    patch_order: str = _opt(
        "raster",
        "Order in which patches are predicted: raster, spiral, checkerboard or random (one fixed "
        "permutation per run, from --seed).",
        "Objective",
    )
    # optimisation
    steps: int | None = _opt(
        None,
        f"Optimizer steps (default {STEPS['aimv1']}; {STEPS['aimv2']} for --objective aimv2, "
        "whose trunk needs them to probe above a random one on the built-in scenes; "
        f"{STEPS['lit']} for --objective lit).",
    )
    batch_size: int = _opt(
        32, "Images per step over all processes (each of N processes loads batch-size / N)."
    )
    grad_accum: int = _opt(1, "Micro-batches accumulated per optimizer step.")
    lr: float = _opt(1e-3, "Peak learning rate (AdamW).")
    min_lr: float = _opt(1e-5, "Learning rate at the end of the cosine decay.")
    warmup_steps: int | None = _opt(
        None, "Linear warm-up steps before the cosine decay (default: 10% of --steps)."
    )
    weight_decay: float = _opt(
        0.05, "AdamW weight decay (not applied to norms, biases and position embeddings)."
    )
    beta1: float = _opt(0.9, "AdamW beta1.")
    beta2: float = _opt(0.95, "AdamW beta2.")
    grad_clip: float = _opt(1.0, "Clip the global gradient norm to this value (0: no clipping).")
    seed: int = _opt(0, "Random seed: initialisation, data order, augmentation, prefixes.")
    # output
    output: str | None = _opt(
        None,
        "Output directory (default: runs/<model>). Holds a checkpoint? The run resumes.",
        "Output",
    )
    resume: bool = _opt(False, "Require a checkpoint in --output and continue from it.", "Output")
    checkpoint_every: int = _opt(50, "Write a checkpoint every N steps (and at the end).", "Output")
    keep_checkpoints: int = _opt(3, "Keep the last K intact checkpoints.", "Output")
    allow_data_change: bool = _opt(
        False,
        "Resume even though training files were added, removed or modified since the checkpoint.",
        "Output",
    )
    log_every: int = _opt(10, "Log training metrics every N steps.", "Output")
    val_every: int = _opt(
        50, "Evaluate the validation loss every N steps (0: at the end).", "Output"
    )
    preview_every: int = _opt(
        50, "Write a prediction preview PNG every N steps (0: never).", "Output"
    )
    preview_images: int = _opt(4, "Images shown in each preview.", "Output")
    probe_data: str | None = _opt(
        None,
        "Labelled images (class folders, optionally split in train/ and val/; or a built-in set "
        "by name: digits, scenes/count, scenes/colour, scenes/shape) for a quick linear probe of the trunk every --probe-every steps; its "
        "top-1 goes to metrics.jsonl and loss.png.",
        "Output",
    )
    probe_every: int = _opt(
        50, "Probe the trunk on --probe-data every N steps (0: at the end only).", "Output"
    )
    quiet: bool = _opt(False, "No progress display; errors and the final summary only.", "Output")

    # ---- derived ------------------------------------------------------------------------------

    @property
    def warmup(self) -> int:
        """Warm-up steps actually used."""
        if self.warmup_steps is None:
            return max(1, math.ceil(0.1 * self.steps))
        return self.warmup_steps

    def __post_init__(self) -> None:
        """Fill the defaults that depend on the objective (recorded as filled, so a resumed run
        compares concrete values)."""
        scenes = "scenes" if self.objective == "aimv2" else None
        builtin_scenes = (builtin_name(self.data) if self.data else scenes) == "scenes"
        if self.steps is None:
            self.steps = STEPS.get(self.objective, STEPS["aimv1"])
        if self.model is None and self.objective != "lit":  # LiT needs the trunk named
            self.model = "aimv2-nano" if self.objective == "aimv2" else "aim-nano"
        if self.hflip is None:
            self.hflip = 0.0 if builtin_scenes else 0.5
        if self.min_crop_scale is None:
            self.min_crop_scale = 1.0 if builtin_scenes else 0.4

    @property
    def model_name(self) -> str:
        if self.objective == "lit":
            return f"{Path(self.model or 'trunk').name}-lit"
        return Path(self.model).stem if self.model.endswith(".json") else self.model

    @property
    def output_dir(self) -> Path:
        return Path(self.output or Path("runs") / self.model_name).expanduser()

    # ---- checks and conversion ----------------------------------------------------------------

    def validate(self) -> TrainConfig:
        """Raise ``InputError`` naming the flag of the first invalid setting; return ``self``."""
        for f, _ in config_fields():
            _check_number(f.name, getattr(self, f.name))
        positive = ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints")
        positive += ("log_every", "preview_images", "val_images", "head_width")
        for name in positive:
            _check_range(name, getattr(self, name), 1, INT_MAX)
        zero_or_more = ("val_every", "preview_every", "probe_every", "workers", "head_blocks")
        for name in (*zero_or_more, "warmup_steps"):
            _check_range(name, getattr(self, name), 0, INT_MAX)
        for name in ("weight_decay", "min_lr", "grad_clip"):
            _check_range(name, getattr(self, name), 0, math.inf)
        _check_range("seed", self.seed, 0, SEED_MAX)
        if not self.lr > 0:
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        if self.min_lr > self.lr:
            raise InputError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if self.warmup > self.steps:
            raise InputError(
                f"--warmup-steps ({self.warmup}) must not exceed --steps ({self.steps})"
            )
        for name in ("val_fraction", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.min_crop_scale <= 1:
            raise InputError(f"--min-crop-scale must be in (0, 1], got {self.min_crop_scale}")
        if not 0 <= self.hflip <= 1:
            raise InputError(f"--hflip must be in [0, 1], got {self.hflip}")
        if self.objective not in OBJECTIVES:
            raise InputError(
                f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        for name in ("decoder_width", "decoder_depth", "decoder_heads", "vocab_size"):
            _check_range(name, getattr(self, name), 1, INT_MAX)
        lit_sizes = ("text_width", "text_depth", "text_heads", "projection_dim", "context_length")
        for name in lit_sizes:
            _check_range(name, getattr(self, name), 1, INT_MAX)
        _check_range("alpha", self.alpha, 0, math.inf)
        if self.objective == "lit":
            self._validate_lit()
        if self.objective != "aimv1":
            ablations = ("target", "attention", "patch_order")
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changed = [f"--{_flag(n)}" for n in ablations if getattr(self, n) != defaults[n]]
            if changed:
                raise InputError(
                    f"{', '.join(changed)}: AIMv1-objective switches; --objective "
                    f"{self.objective} keeps the paper's choices"
                )
        choices = (
            ("dtype", DTYPES), ("target", TARGETS), ("attention", ATTENTIONS),
            ("patch_order", PATCH_ORDERS),
        )  # fmt: skip
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise InputError(
                    f"--{_flag(name)} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        return self

    def _validate_lit(self) -> None:
        if self.model is None:
            raise InputError(
                "--objective lit needs --model TRUNK: an AIMv2 trunk (a training run's folder, a "
                "converted model, a registry name; an architecture name gives a random trunk)"
            )
        if self.probe_data is not None:
            raise InputError("--probe-data: not with --objective lit (its trunk is frozen)")
        if self.tokenizer is not None:
            raise InputError(
                "--tokenizer: not with --objective lit (it trains a CLIP BPE of --vocab-size on "
                "the captions, or takes the tokenizer of --text-init)"
            )
        if self.text_width % self.text_heads:
            raise InputError(
                f"--text-width ({self.text_width}) must be a multiple of --text-heads "
                f"({self.text_heads})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping of field names (``-`` or ``_``); unknown keys or types raise."""
        return cls(**_check_values(values, source)).validate()


def objective_variant(config: TrainConfig, encoder: Any) -> Variant:
    """The objective ``config`` asks for (targets, attention, patch order) on ``encoder``'s grid."""
    grid = encoder.image_size // encoder.patch_size
    order = None
    if config.patch_order != "raster":  # raster order permutes nothing
        order = tuple(patch_order(config.patch_order, grid, grid, config.seed).tolist())
    return Variant(target=config.target, attention=config.attention, order=order)


def objective_label(config: TrainConfig) -> str:
    """The switches in a few words, for titles: "norm-pixels, prefix attention, raster order,
    crop 0.4-1" (and the pixel head's depth and width when set)."""
    if config.objective == "aimv2":
        label = f"AIMv2 objective, alpha {config.alpha:g}"
    else:
        label = f"{config.target}, {config.attention} attention, {config.patch_order} order"
    label += f", crop {config.min_crop_scale:g}-1"
    if config.head_blocks is not None:
        label += f", {plural(config.head_blocks, 'head block')}"
    if config.head_width is not None:
        label += f", head width {config.head_width}"
    return label


def config_fields() -> list[tuple[dataclasses.Field, Any]]:
    """``(field, resolved type)`` of every ``TrainConfig`` field, in order."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_number(name: str, value: Any) -> None:
    """Refuse NaN and infinite floats (NaN passes every comparison unnoticed)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"--{_flag(name)} must be a finite number, got {value}")


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        bound = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise InputError(f"--{_flag(name)} must be {bound}, got {value}")


def _check_values(values: dict[str, Any], source: str) -> dict[str, Any]:
    types_by_name = {f.name: t for f, t in config_fields()}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in types_by_name:
            raise InputError(
                f"{source}: unknown setting {key!r} (the settings are the flags listed by "
                "`mlx-aim train --help`)"
            )
        out[name] = _coerce(value, types_by_name[name], f"{source}: setting {key!r}")
    return out


def _coerce(value: Any, annotation: Any, what: str) -> Any:
    """``value`` checked against the field's type (``matches_type``); ints become floats."""
    if isinstance(value, Path):
        value = str(value)
    if not matches_type(value, annotation):
        allowed = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
        names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
        raise InputError(f"{what} must be {names}, got {value!r}")
    allowed = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return float(value) if float in allowed and isinstance(value, int) else value


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``) file.

    Keys are flag names (``batch-size`` or ``batch_size``); the result uses field names.
    """
    path = Path(path).expanduser()
    text = io.read_text(path, max_bytes=2**20)
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise InputError(
                    f"{path}: reading YAML needs PyYAML (pip install 'mlx-aim[yaml]'), or use TOML"
                ) from None
            values = yaml.safe_load(text)
        elif suffix == ".json":
            values = json.loads(text)
        else:
            raise InputError(f"{path}: config files must end in .toml, .yaml, .yml or .json")
    except InputError:
        raise
    except Exception as e:  # each parser has its own error class; all mean "invalid syntax"
        raise InputError(f"{path}: invalid {suffix[1:].upper()} ({_first_line(e)})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a table of settings, got {type(values).__name__}")
    return _check_values(values, str(path))


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]
