"""mlx-aim's weight format: round trips, sharding, strict loading and hostile files."""

import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_V1

import mlx_aim
from mlx_aim.checkpoints.weights import (
    WeightsError,
    apply_weights,
    check_safetensors,
    load_model,
    read_model_weights,
    save_model,
)
from mlx_aim.errors import InputError, OutputError
from mlx_aim.models import build_model
from mlx_aim.models.base import ConfigError

TINY = {
    **TINY_V1,
    "image_size": 16,
    "patch_size": 8,
    "embed_dim": 16,
    "num_heads": 2,
    "num_classes": 3,
    "probe_layers": [1],
}


def test_save_and_load_round_trip(tmp_path):
    model = build_model(TINY)
    model.eval()
    save_model(model, tmp_path / "m")
    loaded = mlx_aim.load(tmp_path / "m")
    x = mx.random.normal((2, 16, 16, 3))
    np.testing.assert_array_equal(loaded(x), model(x))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "aim_v1"


def test_sharded_save_loads_the_same_weights(tmp_path):
    model = build_model(TINY)
    save_model(model, tmp_path / "m", max_shard_bytes=4096)
    files = sorted(p.name for p in (tmp_path / "m").glob("model-*.safetensors"))
    assert len(files) > 1 and (tmp_path / "m" / "model.safetensors.index.json").exists()
    loaded = load_model(tmp_path / "m")
    for key, value in read_model_weights(tmp_path / "m").items():
        np.testing.assert_array_equal(value, dict(_flat(loaded))[key])


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_save_refuses_to_overwrite_without_permission(tmp_path):
    model = build_model(TINY)
    save_model(model, tmp_path / "m")
    with pytest.raises(OutputError, match="already exists.*--force"):
        save_model(model, tmp_path / "m")
    save_model(model, tmp_path / "m", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_extra_and_misshaped_tensors_are_named():
    model = build_model(TINY)
    weights = dict(_flat(model))
    with pytest.raises(WeightsError, match="missing 1 tensor.*head.k.weight"):
        apply_weights(build_model(TINY), {k: v for k, v in weights.items() if k != "head.k.weight"})
    with pytest.raises(WeightsError, match="unexpected tensor.*bogus"):
        apply_weights(build_model(TINY), {**weights, "bogus": mx.zeros(1)})
    bad = {**weights, "head.linear.weight": mx.zeros((4, 16))}
    with pytest.raises(
        WeightsError,
        match=r"head.linear.weight: checkpoint shape \(4, 16\) != model shape \(3, 16\)",
    ):
        apply_weights(build_model(TINY), bad)


def test_torch_layout_patch_weight_is_transposed_once():
    model = build_model(TINY)
    weights = dict(_flat(model))
    key = "preprocessor.patchifier.proj.weight"
    torch_layout = {**weights, key: weights[key].transpose(0, 3, 1, 2)}
    apply_weights(target := build_model(TINY), torch_layout)
    np.testing.assert_array_equal(target.preprocessor.patchifier.proj.weight, weights[key])
    apply_weights(target, weights)  # already MLX layout: untouched
    np.testing.assert_array_equal(target.preprocessor.patchifier.proj.weight, weights[key])


def _write_raw_safetensors(path, header, data):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize(
    "header,data,message",
    [
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "outside"),
        (
            {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}},
            b"\0" * 16,
            "needs 12 bytes",
        ),
        (
            {"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}},
            b"\0" * 16,
            "unknown dtype",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 16,
            "overlap",
        ),
        (
            {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "invalid shape",
        ),
    ],
)
def test_lying_safetensors_headers_are_refused(tmp_path, header, data, message):
    path = tmp_path / "x.safetensors"
    _write_raw_safetensors(path, header, data)
    with pytest.raises(WeightsError, match=message):
        check_safetensors(path)


def test_garbage_and_truncated_weight_files_are_refused(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        check_safetensors(tmp_path / "a.safetensors")
    model = build_model(TINY)
    save_model(model, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        mlx_aim.load(tmp_path / "m")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "aim_v9"}, "model_type"),
        ({"embed_dim": "16"}, "'embed_dim' must be"),
        ({"embed_dim": 17}, "divisible by 'num_heads'"),
        ({"image_size": 20}, "multiple of 'patch_size'"),
        ({"num_blocks": 0}, "'num_blocks' must be positive"),
        ({"probe_layers": [5]}, "probe_layers"),
        ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
    ],
)
def test_invalid_configs_name_the_field(tmp_path, change, message):
    model = build_model(TINY)
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=message):
        mlx_aim.load(tmp_path / "m")


def test_missing_field_is_named():
    config = {k: v for k, v in TINY.items() if k != "model_type"}
    with pytest.raises(ConfigError, match="model_type"):
        build_model(config)


def test_unknown_source_says_what_it_accepts(tmp_path):
    with pytest.raises(InputError, match="not a known model name"):
        mlx_aim.load(tmp_path / "nothing-here")
