"""Named architectures and the released AIM / AIMv2 checkpoints.

``ARCHITECTURES`` maps a name to a model config (``config.json`` content). Names of released models
also have a ``Checkpoint``: hub repo, files, the revision ml-aim pins, and the preprocessing that
model was evaluated with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data.transforms import CLIP_MEAN, CLIP_STD, Preprocessing
from ..errors import InputError
from ..models.base import last_six_blocks


def aim_v1_preprocessing(size: int) -> Preprocessing:
    """ml-aim's AIMv1 evaluation transform: resize ceil(size / 0.875), centre-crop, ImageNet stats."""
    return Preprocessing(resize=-(-size * 8 // 7), crop=size)


def aim_v2_preprocessing(size: int, native: bool = False) -> Preprocessing:
    """The AIMv2 hub preprocessor: bicubic shortest edge to ``size``, centre-crop (offsets
    floored, as Hugging Face's CLIPImageProcessor), CLIP stats."""
    return Preprocessing(size, size, CLIP_MEAN, CLIP_STD, crop_offsets="floor", native=native)


@dataclass(frozen=True)
class Checkpoint:
    """A released checkpoint on the Hugging Face Hub."""

    repo: str
    revision: str | None
    files: tuple[str, ...]
    head_files: dict[str, str] = field(default_factory=dict)
    best_layers: tuple[int, ...] = ()
    url: str = ""


def _aim_v1(dim: int, blocks: int, heads: int, size: int = 224, patch: int = 14) -> dict:
    return {
        "model_type": "aim_v1",
        "image_size": size,
        "patch_size": patch,
        "embed_dim": dim,
        "num_blocks": blocks,
        "num_heads": heads,
    }


def _aim_v2(
    dim: int,
    blocks: int,
    heads: int,
    hidden: int,
    size: int,
    pos: str = "absolute",
    patch: int = 14,
):
    return {
        "model_type": "aim_v2",
        "image_size": size,
        "patch_size": patch,
        "embed_dim": dim,
        "num_blocks": blocks,
        "num_heads": heads,
        "mlp_hidden_dim": hidden,
        "pos_embed_type": pos,
    }


# Laptop-sized AIMv1 trunks for pre-training from scratch, with their pixel-head defaults.
LAPTOP_ARCHITECTURES: dict[str, tuple[dict, dict]] = {
    # Pre-trains in minutes on a laptop CPU (the built-in digits demo).
    "aim-nano": (_aim_v1(128, 4, 4, size=32, patch=4), {"head_blocks": 2, "head_width": 256}),
    "aim-tiny": (_aim_v1(192, 12, 3, patch=16), {"head_blocks": 4, "head_width": 512}),
    "aim-small": (_aim_v1(384, 12, 6, patch=16), {"head_blocks": 6, "head_width": 1024}),
    "aim-base": (_aim_v1(768, 12, 12, patch=16), {"head_blocks": 8, "head_width": 1536}),
}

# Laptop-sized AIMv2 trunks for multimodal pre-training (SwiGLU hidden = 2.75 x width, as the
# released models), with their pixel-head (AIMv1 objective) and decoder (AIMv2 objective) defaults.
LAPTOP_AIM_V2_ARCHITECTURES: dict[str, tuple[dict, dict, dict]] = {
    # Pre-trains in minutes on a laptop CPU (the built-in scenes demo).
    "aimv2-nano": (
        _aim_v2(128, 4, 4, 352, size=32, patch=4),
        {"head_blocks": 2, "head_width": 256},
        {"decoder_width": 128, "decoder_depth": 2, "decoder_heads": 4},
    ),
    "aimv2-tiny": (
        _aim_v2(192, 12, 3, 528, size=224, patch=16),
        {"head_blocks": 4, "head_width": 512},
        {"decoder_width": 256, "decoder_depth": 4, "decoder_heads": 4},
    ),
}

_AIM_V1_RELEASES = {
    # name: (config, hub file stem, best probe layers)
    "aim-600M": (_aim_v1(1536, 24, 12), "aim_600m_2bimgs", (14, 15, 16, 17, 18, 19)),
    "aim-1B": (_aim_v1(2048, 24, 16), "aim_1b_5bimgs", (12, 13, 14, 15, 16, 17)),
    "aim-3B": (_aim_v1(3072, 24, 24), "aim_3b_5bimgs", (12, 13, 14, 15, 16, 17)),
    "aim-7B": (_aim_v1(4096, 32, 32), "aim_7b_5bimgs", (14, 15, 16, 17, 18, 19)),
}

_AIM_V2_SIZES = {
    "large": (1024, 24, 8, 2816),
    "huge": (1536, 24, 12, 4096),
    "1B": (2048, 24, 16, 5632),
    "3B": (3072, 24, 24, 8192),
}

# Revisions pinned by apple/ml-aim: later commits on `main` switched model.safetensors to the
# transformers layout.
_AIM_V2_REVISIONS = {
    "aimv2-large-patch14-224": "ac764a25c832c7dc5e11871daa588e98e3cdbfb7",
    "aimv2-huge-patch14-224": "9e0bab0e0abb7b20796d2d0b37f39b7c3b1c1af1",
    "aimv2-1B-patch14-224": "4d24a422f71e87d327d476bc405030fe6593d8b1",
    "aimv2-3B-patch14-224": "df1cbc288096c9742ec8bd6709ff82757972338c",
    "aimv2-large-patch14-336": "639423ae9f07319d24a7fc431b61908110d08d3a",
    "aimv2-huge-patch14-336": "21528bd53a2438a84162e79f1f9a46453b88004c",
    "aimv2-1B-patch14-336": "5a15f23f6757776fdd487283353a018677621939",
    "aimv2-3B-patch14-336": "d1adb39ee92dfd7ecf3114b1ee3aa7e9027ce98f",
    "aimv2-large-patch14-448": "cefb13f21003bdadba65bfbee956c82b976cd23d",
    "aimv2-huge-patch14-448": "44e6440a24a8ea966ad0deadf5399a22d852bcc0",
    "aimv2-1B-patch14-448": "7f292735d3a07a911559c0fabb3ad3e9d141713f",
    "aimv2-3B-patch14-448": "70810b618e4456b724bacc8ef4d2d038060ceda6",
    "aimv2-large-patch14-224-distilled": "d6d09b071e8ba31735c5e05ccd4b2a393020ce90",
    "aimv2-large-patch14-336-distilled": "8fe1704e5cc1c80cefc99c194afcefe21dff1faa",
    "aimv2-large-patch14-native": "cfe7bdbbc924a5f65272d5e2c27fe5f61771a629",
}

# The AIMv2-L image encoder with a LiT-trained text tower (zero-shot), at ml-aim's pinned revision.
LIT_NAME = "aimv2-large-patch14-224-lit"
LIT_REVISION = "c2cd59a786c4c06f39d199c50d08cc2eab9f8605"


@dataclass(frozen=True)
class Entry:
    """A registry entry: architecture, preprocessing and, for released models, the checkpoint."""

    name: str
    config: dict[str, Any]
    preprocessing: Preprocessing
    checkpoint: Checkpoint | None = None
    pretrain_head: dict[str, Any] = field(default_factory=dict)
    pretrain_decoder: dict[str, Any] = field(default_factory=dict)


def _build_registry() -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for name, (config, head) in LAPTOP_ARCHITECTURES.items():
        prep = aim_v1_preprocessing(config["image_size"])
        entries[name] = Entry(name, config, prep, pretrain_head=head)
    for name, (config, head, decoder) in LAPTOP_AIM_V2_ARCHITECTURES.items():
        prep = aim_v2_preprocessing(config["image_size"])
        entries[name] = Entry(name, config, prep, pretrain_head=head, pretrain_decoder=decoder)
    for name, (config, stem, best) in _AIM_V1_RELEASES.items():
        base = "https://huggingface.co/apple/AIM/resolve/main/"
        ckpt = Checkpoint(
            repo="apple/AIM",
            revision=None,
            files=(f"{stem}_attnprobe_backbone.pth",),
            head_files={
                "last": f"{stem}_attnprobe_head_last_layers.pth",
                "best": f"{stem}_attnprobe_head_best_layers.pth",
            },
            best_layers=best,
            url=base,
        )
        entries[name] = Entry(name, config, aim_v1_preprocessing(224), ckpt, {"head_blocks": 12})
    for name, revision in _AIM_V2_REVISIONS.items():
        size_name, res = name.split("-")[1], name.split("-")[3]
        dim, blocks, heads, hidden = _AIM_V2_SIZES[size_name]
        native = res == "native"
        size = 224 if native else int(res)
        config = _aim_v2(dim, blocks, heads, hidden, size, "sincos" if native else "absolute")
        ckpt = Checkpoint(
            repo=f"apple/{name}",
            revision=revision,
            files=("mlx_model.safetensors", "model.safetensors"),
        )
        entries[name] = Entry(name, config, aim_v2_preprocessing(size, native), ckpt)
    lit = Checkpoint(
        repo=f"apple/{LIT_NAME}",
        revision=LIT_REVISION,
        files=("mlx_model.safetensors", "model.safetensors"),
    )
    lit_config = {"model_type": "aim_v2_lit", "vision": _aim_v2(*_AIM_V2_SIZES["large"], 224)}
    entries[LIT_NAME] = Entry(LIT_NAME, lit_config, aim_v2_preprocessing(224), lit)
    return entries


REGISTRY: dict[str, Entry] = _build_registry()


def get_entry(name: str) -> Entry:
    """The registry entry of ``name``; the error lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; known names: {', '.join(sorted(REGISTRY))}"
        ) from None


def pretrain_config(name: str, **head: Any) -> dict[str, Any]:
    """An ``aim_pretrain`` config: the named trunk plus its pixel-head defaults, overridable."""
    entry = get_entry(name)
    encoder = dict(entry.config)
    return {"model_type": "aim_pretrain", "encoder": encoder, **entry.pretrain_head, **head}


def multimodal_pretrain_config(name: str, **decoder: Any) -> dict[str, Any]:
    """An ``aimv2_pretrain`` config: the named AIMv2 trunk plus its decoder defaults, overridable."""
    entry = get_entry(name)
    if entry.config["model_type"] != "aim_v2":
        raise KeyError(f"{name!r} is not an AIMv2 architecture (e.g. aimv2-nano, aimv2-tiny)")
    encoder = dict(entry.config)
    return {"model_type": "aimv2_pretrain", "encoder": encoder, **entry.pretrain_decoder, **decoder}


def default_preprocessing(config: dict[str, Any]) -> Preprocessing:
    """Preprocessing for a model with no ``preprocess.json``: its family's evaluation transform."""
    if config.get("model_type") in ("aim_pretrain", "aimv2_pretrain"):
        config = config["encoder"]
    if config.get("model_type") == "aim_v2_lit":
        config = config["vision"]
    size = config["image_size"]
    if config["model_type"] == "aim_v2":
        return aim_v2_preprocessing(size, native=config.get("pos_embed_type") == "sincos")
    return aim_v1_preprocessing(size)


def known_best_layers(args: Any, name: str | None = None) -> tuple[int, ...]:
    """The released "best" probe blocks of an AIMv1 model, by registry name or architecture."""
    entry = REGISTRY.get(name) if name else None
    if entry is not None and entry.checkpoint is not None:
        return entry.checkpoint.best_layers
    keys = ("model_type", "embed_dim", "num_blocks", "num_heads", "patch_size")
    for entry in REGISTRY.values():
        if entry.checkpoint and entry.checkpoint.best_layers:
            if all(entry.config[k] == getattr(args, k) for k in keys):
                return entry.checkpoint.best_layers
    return ()


def resolve_layers(spec: str | Sequence[int], args: Any, name: str | None = None) -> list[int]:
    """Block indices for ``last`` (the last six), ``best`` (released AIMv1 only) or ``i,j,k``.

    Negative indices count from the end.
    """
    n = args.num_blocks
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "last":
            return last_six_blocks(n)
        if spec == "best":
            best = known_best_layers(args, name)
            if not best:
                released = ", ".join(
                    k for k, e in REGISTRY.items() if e.checkpoint and e.checkpoint.best_layers
                )
                raise InputError(
                    f"--layers best is only defined for the released AIMv1 models ({released})"
                )
            return list(best)
        try:
            spec = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise InputError(
                f"--layers must be last, best or block indices like 3,4,5; got {spec!r}"
            ) from None
    layers = []
    for i in spec:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise InputError(f"--layers: block {i} does not exist, the trunk has blocks 0..{n - 1}")
        if j not in layers:
            layers.append(j)
    if not layers:
        raise InputError("--layers names no block")
    return layers
