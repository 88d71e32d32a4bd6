"""Model configuration base: typed, validated dataclasses read from ``config.json``."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from ..errors import InputError


class ConfigError(InputError):
    """A model configuration that cannot describe a valid model; the message names the field."""


# The probe heads a classifier config may ask for (``ModelArgs.head``, ``ProbeConfig.head``).
HEADS = ("attentive", "linear")
# Fields renamed since configs were first written: old name -> current name (old files still load).
RENAMED_FIELDS = {"classifier": "head"}


def last_six_blocks(num_blocks: int) -> list[int]:
    """The default probe layers: the last six blocks (every block of a shallower trunk)."""
    return list(range(max(0, num_blocks - 6), num_blocks))


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is Any:
        return True
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


@dataclasses.dataclass
class BaseModelArgs:
    """Common behaviour of the per-model ``ModelArgs`` dataclasses."""

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BaseModelArgs:
        """Build and validate a config; unknown, missing or wrong-typed fields raise ConfigError."""
        if not isinstance(config, dict):
            raise ConfigError(f"config must be a JSON object, got {type(config).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        config = {
            RENAMED_FIELDS[k] if k in RENAMED_FIELDS and RENAMED_FIELDS[k] in fields else k: v
            for k, v in config.items()
        }
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(config) - set(fields) - {"quantization"})
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} for model_type {cls.model_type!r}")
        for name, field in fields.items():
            has_default = not (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            )
            if name not in config:
                if not has_default:
                    raise ConfigError(f"missing field {name!r}")
                continue
            if not _matches(config[name], hints[name]):
                raise ConfigError(f"field {name!r} must be {hints[name]}, got {config[name]!r}")
        args = cls(**{k: v for k, v in config.items() if k in fields})
        args.validate()
        return args

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check that the shapes are consistent; subclasses extend this."""
        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "embed_dim",
            "num_blocks",
            "num_heads",
        ):
            value = getattr(self, name, None)
            if value is not None and value <= 0:
                raise ConfigError(f"field {name!r} must be positive, got {value}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"field 'embed_dim' ({self.embed_dim}) must be divisible by 'num_heads' "
                f"({self.num_heads})"
            )
        if getattr(self, "num_classes", 0) < 0:
            raise ConfigError(f"field 'num_classes' must be >= 0, got {self.num_classes}")
        if getattr(self, "head", "attentive") not in HEADS:
            raise ConfigError(f"field 'head' must be 'attentive' or 'linear', got {self.head!r}")
        layers = getattr(self, "probe_layers", None)
        if layers is not None and (not layers or not all(0 <= i < self.num_blocks for i in layers)):
            raise ConfigError(
                f"field 'probe_layers' {layers} must name blocks in [0, {self.num_blocks})"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"field 'image_size' ({self.image_size}) must be a multiple of 'patch_size' "
                f"({self.patch_size})"
            )

    @property
    def feature_layers(self) -> list[int]:
        """Blocks averaged by a classifier: ``probe_layers`` or the last six."""
        layers = getattr(self, "probe_layers", None)
        return list(layers) if layers else last_six_blocks(self.num_blocks)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


def matches_type(value: Any, annotation: Any) -> bool:
    """Whether a JSON-like ``value`` fits the type ``annotation`` (a bool is not an int)."""
    return _matches(value, annotation)
