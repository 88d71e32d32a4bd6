"""AIMv1 release files (ml-aim .pth layout) imported by mlx-aim match the PyTorch reference."""

import pytest
import torch
from parity import PARITY_REL, relative_error
from release_files import (
    V1_BEST_LAYERS,
    V1_CONFIG,
    aim_v1_reference,
    aim_v1_with_probe_layers,
    images,
    nhwc,
    register_tiny_architectures,
    write_v1_release,
)

import mlx_aim
from mlx_aim.checkpoints.convert import convert
from mlx_aim.models import layers

SIZES = [(28, 28), (28, 42)]  # sin-cos positions: non-square grids work too
LAST_SIX = list(range(1, 7))


@pytest.fixture
def release(tmp_path, monkeypatch):
    register_tiny_architectures(monkeypatch)
    reference = aim_v1_reference()
    return reference, write_v1_release(reference, tmp_path / "release")


@pytest.fixture
def block_calls(monkeypatch):
    """Records every trunk block evaluated (Python-level calls build the lazy graph)."""
    calls = []
    original = layers.Block.__call__

    def counting(self, x, mask=None):
        calls.append(self)
        return original(self, x, mask)

    monkeypatch.setattr(layers.Block, "__call__", counting)
    return calls


@torch.no_grad()
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_backbone_plus_head_files_give_reference_logits_and_features(release, tmp_path, size):
    reference, files = release
    convert(files["backbone"], tmp_path / "out", head=files["last"])
    model = mlx_aim.load(tmp_path / "out")
    assert model.args.num_classes == 10 and model.args.feature_layers == LAST_SIX

    x = images(2, *size)
    logits_diff = relative_error(model(nhwc(x)), reference(x))
    features = model.extract_features(nhwc(x))
    expected = reference.extract_features(x)
    assert len(features) == len(expected) == V1_CONFIG["num_blocks"]
    feature_diff = max(relative_error(f, e) for f, e in zip(features, expected, strict=True))
    tokens_diff = relative_error(
        model.encode(nhwc(x)), reference.trunk.post_trunk_norm(expected[-1])
    )
    print(
        f"aimv1 {size}: max|diff| logits {logits_diff:.1e} blocks {feature_diff:.1e} "
        f"tokens {tokens_diff:.1e} (|logits| up to {reference(x).abs().max():.1f})"
    )
    assert reference(x).abs().max() > 1.0  # the tolerance is small against the outputs
    assert logits_diff <= PARITY_REL and feature_diff <= PARITY_REL and tokens_diff <= PARITY_REL


@torch.no_grad()
@pytest.mark.parametrize(
    "spec,layers_used",
    [(None, LAST_SIX), ("last", LAST_SIX), ("0,2,5", [0, 2, 5]), ("best", list(V1_BEST_LAYERS))],
)
def test_merged_file_with_each_probe_layer_choice(release, spec, layers_used):
    reference, files = release
    model = mlx_aim.load(files["merged"], head=spec)
    assert model.args.feature_layers == layers_used
    expected_model = aim_v1_with_probe_layers(reference, layers_used)
    x = images(3, 28, 42, seed=1)
    assert relative_error(model(nhwc(x)), expected_model(x)) <= PARITY_REL
    # A different choice of layers gives clearly different logits: the choice is honoured.
    other = aim_v1_with_probe_layers(reference, [0])
    assert relative_error(model(nhwc(x)), other(x)) > 0.1


@torch.no_grad()
def test_best_layers_head_file_selects_the_registered_best_layers(release, tmp_path):
    reference, files = release
    convert(files["backbone"], tmp_path / "best", head=files["best"])
    model = mlx_aim.load(tmp_path / "best")
    assert model.args.probe_layers == list(V1_BEST_LAYERS)
    x = images(2, 28, 28, seed=2)
    expected = aim_v1_with_probe_layers(reference, V1_BEST_LAYERS)(x)
    assert relative_error(model(nhwc(x)), expected) <= PARITY_REL


@torch.no_grad()
def test_backbone_alone_gives_reference_tokens(release):
    reference, files = release
    model = mlx_aim.load(files["backbone"])
    assert "head" not in model
    x = images(1, 42, 28, seed=3)
    expected = reference.trunk.post_trunk_norm(reference.extract_features(x)[-1])
    assert relative_error(model(nhwc(x)), expected) <= PARITY_REL


@pytest.mark.parametrize("spec,evaluated", [("0,2", 3), ("1", 2), ("last", 7)])
def test_classifier_runs_no_block_after_the_last_probe_layer(release, block_calls, spec, evaluated):
    model = mlx_aim.load(release[1]["merged"], head=spec)
    block_calls.clear()
    model(nhwc(images(1, 28, 28)))
    assert block_calls == list(model.trunk.blocks[:evaluated])


def test_extract_features_runs_only_the_blocks_asked_for(release, block_calls):
    model = mlx_aim.load(release[1]["backbone"])
    block_calls.clear()
    assert len(model.extract_features(nhwc(images(1, 28, 28)), max_block_id=1)) == 2
    assert len(block_calls) == 2
