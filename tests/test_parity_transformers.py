"""Parity with transformers' Aimv2VisionModel after import through mlx-aim's converter."""

import mlx.core as mx
import numpy as np
import pytest
from parity import assert_parity

import mlx_aim

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _random_hf_model(tmp_path, is_native):
    config = transformers.Aimv2VisionConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        use_head=False,
        is_native=is_native,
    )
    torch.manual_seed(0)
    model = transformers.Aimv2VisionModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # every tensor random: norms and biases included
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if param.ndim == 1 else 0.0))
    model.save_pretrained(tmp_path / "hf")
    return model


@pytest.mark.parametrize(("is_native", "height", "width"), [(False, 56, 56), (True, 42, 70)])
def test_final_tokens_match_transformers(tmp_path, is_native, height, width):
    reference = _random_hf_model(tmp_path, is_native)
    model = mlx_aim.load(tmp_path / "hf")
    assert model.args.pos_embed_type == ("sincos" if is_native else "absolute")
    pixels = np.random.default_rng(0).normal(size=(2, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        expected = reference(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert_parity(model(mx.array(pixels.transpose(0, 2, 3, 1))), expected)


def test_block_features_match_transformers_hidden_states(tmp_path):
    reference = _random_hf_model(tmp_path, False)
    model = mlx_aim.load(tmp_path / "hf")
    pixels = np.random.default_rng(1).normal(size=(1, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        hidden = reference(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    features = model.extract_features(mx.array(pixels.transpose(0, 2, 3, 1)))
    for i, feature in enumerate(features):  # hidden_states[0] is the embedding output
        assert_parity(feature, hidden.hidden_states[i + 1], name=f"block {i}")


def test_converted_directory_round_trips(tmp_path):
    _random_hf_model(tmp_path, False)
    direct = mlx_aim.load(tmp_path / "hf")
    from mlx_aim.checkpoints.convert import convert

    convert(tmp_path / "hf", tmp_path / "ours")
    again = mlx_aim.load(tmp_path / "ours")
    x = mx.random.normal((1, 56, 56, 3))
    np.testing.assert_array_equal(direct(x), again(x))
    assert again.preprocessing.mean == direct.preprocessing.mean
