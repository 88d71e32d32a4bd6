"""Every released architecture builds exactly the parameter shapes of its checkpoint, lazily.

MLX arrays are lazy: building a model without ``mx.eval`` records the initialisers but allocates no
weight memory, so even AIM-7B (26 GB in float32) is checked in milliseconds.
"""

import math

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_aim.checkpoints.registry import REGISTRY
from mlx_aim.models import build_model
from mlx_aim.reference.torch_aim import REFERENCE_ARCHS, expected_state_dict_shapes

# Released vision encoders; the LiT dual encoder's layout is checked in tests/test_lit.py.
RELEASED = [
    name
    for name, entry in REGISTRY.items()
    if entry.checkpoint is not None and entry.config["model_type"] != "aim_v2_lit"
]

# Encoder parameters (billions) as the papers state them (AIMv1 Table 1, AIMv2 Table 1). Both
# papers call the 1536-wide, 24-block encoders "0.6B" although they hold 0.68B parameters.
PAPER_BILLIONS = {
    "aim-600M": 0.6,
    "aim-1B": 1.2,
    "aim-3B": 2.7,
    "aim-7B": 6.5,
    "aimv2-large": 0.3,
    "aimv2-huge": 0.6,
    "aimv2-1B": 1.2,
    "aimv2-3B": 2.7,
}
ROUNDED_DOWN = {"aim-600M", "aimv2-huge"}


def _family(name: str) -> str:
    return name if name.startswith("aim-") else "-".join(name.split("-")[:2])


def _reference_arch(name: str) -> dict:
    """The reference's released architecture, at the resolution the name says."""
    if name.startswith("aim-"):
        return REFERENCE_ARCHS[name]
    suffix = "native" if name.endswith("native") else "224"
    arch = dict(REFERENCE_ARCHS[f"{_family(name)}-patch14-{suffix}"])
    if suffix != "native":
        arch["image_size"] = int(name.split("-")[3])
    return arch


def _lazy_model(name: str):
    config = dict(REGISTRY[name].config)
    if config["model_type"] == "aim_v1":
        config["num_classes"] = 1000  # the released attentive-probe head
    return build_model(config)


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def test_every_checkpoint_family_is_covered():
    assert len(RELEASED) == 19
    assert {_family(n) for n in RELEASED} == set(PAPER_BILLIONS)


@pytest.mark.parametrize("name", RELEASED)
def test_parameter_shapes_equal_the_released_layout(name):
    before = mx.get_active_memory()
    model = _lazy_model(name)
    assert _shapes(model) == expected_state_dict_shapes(_reference_arch(name), layout="mlx")
    assert mx.get_active_memory() - before < 2**20, "building the model allocated its weights"


@pytest.mark.parametrize("name", RELEASED)
def test_parameter_count_matches_the_paper(name):
    shapes = _shapes(_lazy_model(name))
    total = sum(math.prod(s) for s in shapes.values())
    encoder = sum(math.prod(s) for k, s in shapes.items() if not k.startswith("head."))
    paper = PAPER_BILLIONS[_family(name)]
    print(f"{name}: {encoder / 1e9:.3f}B encoder, {total / 1e9:.3f}B with head (paper {paper}B)")
    tolerance = 0.15 if _family(name) in ROUNDED_DOWN else 0.05
    assert abs(encoder / 1e9 - paper) <= tolerance * paper
