"""AIMv2 files in the ml-aim layout (hub safetensors and the official MLX file) match the reference."""

import pytest
import torch
from parity import PARITY_REL, relative_error
from release_files import (
    V2_CONFIG,
    aim_v2_reference,
    images,
    nhwc,
    register_tiny_architectures,
    write_v2_mlaim_layout,
    write_v2_official_mlx,
)

import mlx_aim

WRITERS = {"hub-model.safetensors": write_v2_mlaim_layout, "mlx_model": write_v2_official_mlx}
CASES = [("absolute", (28, 28)), ("sincos", (28, 42)), ("sincos", (35, 21))]


@torch.no_grad()
@pytest.mark.parametrize("layout", WRITERS)
@pytest.mark.parametrize("pos,size", CASES)
@pytest.mark.parametrize("open_as", ["file", "folder"])
def test_tokens_and_block_features_match_the_reference(
    tmp_path, monkeypatch, layout, pos, size, open_as
):
    register_tiny_architectures(monkeypatch)
    reference = aim_v2_reference(pos)
    file = WRITERS[layout](reference, tmp_path / "hub")
    model = mlx_aim.load(file if open_as == "file" else file.parent)
    assert model.args.pos_embed_type == pos and model.args.num_heads == V2_CONFIG["num_heads"]

    x = images(2, *size, seed=4)
    tokens_diff = relative_error(model(nhwc(x)), reference(x))
    features = model.extract_features(nhwc(x))
    expected = reference.extract_features(x)
    feature_diff = max(relative_error(f, e) for f, e in zip(features, expected, strict=True))
    print(
        f"aimv2 {pos} {size} {layout}: max|diff| tokens {tokens_diff:.1e} "
        f"blocks {feature_diff:.1e} (|tokens| up to {reference(x).abs().max():.1f})"
    )
    assert reference(x).abs().max() > 1.0
    assert tokens_diff <= PARITY_REL and feature_diff <= PARITY_REL


def test_absolute_positions_refuse_another_resolution(tmp_path, monkeypatch):
    register_tiny_architectures(monkeypatch)
    file = write_v2_official_mlx(aim_v2_reference("absolute"), tmp_path / "hub")
    model = mlx_aim.load(file)
    with pytest.raises(ValueError, match="learned positions for 16 patches"):
        model(nhwc(images(1, 28, 42)))
