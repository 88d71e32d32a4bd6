"""Loading untrusted model files: only regular files are read, sizes and values are checked
before use, every problem is one line naming the file; training checkpoints load as models."""

import json
import os
import struct
import warnings

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_V1, TINY_V2
from mlx.utils import tree_flatten
from release_files import aim_v2_reference, register_tiny_architectures, write_v2_official_mlx

import mlx_aim
from mlx_aim.checkpoints.convert import convert, read_pth
from mlx_aim.checkpoints.registry import aim_v1_preprocessing, pretrain_config
from mlx_aim.checkpoints.weights import WeightsError, save_model
from mlx_aim.errors import InputError
from mlx_aim.models import build_model, size
from mlx_aim.models.base import ConfigError
from mlx_aim.models.size import estimate_parameters
from mlx_aim.train.checkpoint import STATE_FILE, CheckpointStore

TINY = {**TINY_V1, "image_size": 16, "patch_size": 8, "embed_dim": 16, "num_heads": 2}
V2 = {**TINY_V2, "embed_dim": 16, "num_blocks": 3, "mlp_hidden_dim": 24}


@pytest.fixture
def saved(tmp_path):
    """A tiny model directory and the model it holds."""
    model = build_model(TINY)
    model.eval()
    save_model(model, tmp_path / "m", preprocessing=aim_v1_preprocessing(16))
    return tmp_path / "m", model


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---- only regular files --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "preprocess.json"])
def test_a_fifo_in_place_of_a_model_file_is_refused_without_blocking(saved, name):
    path, _ = saved
    (path / name).unlink()
    os.mkfifo(path / name)
    with pytest.raises(InputError) as error:
        mlx_aim.load(path)
    assert one_line(error) == f"{path / name}: not a regular file (a FIFO)"


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_link_to_dev_zero_is_refused_without_reading(saved, name):
    path, _ = saved
    (path / name).unlink()
    (path / name).symlink_to("/dev/zero")
    with pytest.raises(InputError, match="not a regular file \\(a character device\\)") as error:
        mlx_aim.load(path)
    assert one_line(error).startswith(str(path / name))


def test_weights_linked_to_a_folder_are_refused(saved, tmp_path):
    path, _ = saved
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(InputError, match="not a regular file \\(a directory\\)"):
        mlx_aim.load(path)


# ---- JSON files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "preprocess.json", "model.safetensors.index.json"])
def test_invalid_json_is_one_line_naming_file_line_and_column(tmp_path, name):
    model = build_model(TINY)
    save_model(model, tmp_path / "m", preprocessing=aim_v1_preprocessing(16), max_shard_bytes=4096)
    (tmp_path / "m" / name).write_text('{"resize": 18,\n  oops}')
    with pytest.raises(InputError) as error:
        mlx_aim.load(tmp_path / "m")
    assert one_line(error) == (
        f"{tmp_path / 'm' / name}: invalid JSON (Expecting property name enclosed in double "
        "quotes at line 2 column 3)"
    )


def test_an_index_cannot_point_outside_the_model_folder(tmp_path):
    save_model(build_model(TINY), tmp_path / "other", max_shard_bytes=4096)
    save_model(build_model(TINY), tmp_path / "m", max_shard_bytes=4096)
    index_file = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../other/" + index["weight_map"][first]
    index_file.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="is not a file name inside .*refusing to read it"):
        mlx_aim.load(tmp_path / "m")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"std": [0, 0, 0]}, "'std' must be 3 finite positive numbers"),
        ({"mean": "abc"}, "'mean' must be 3 finite numbers"),
        ({"crop": 100000}, "'crop' must be in 1..4096"),
        ({"resize": "big"}, "'resize' must be an integer"),
    ],
)
def test_invalid_preprocessing_is_refused_at_load(saved, change, message):
    path, _ = saved
    spec = json.loads((path / "preprocess.json").read_text())
    (path / "preprocess.json").write_text(json.dumps({**spec, **change}))
    with pytest.raises(InputError, match=message) as error:
        mlx_aim.load(path)
    assert one_line(error).startswith(f"{path / 'preprocess.json'}: preprocessing")


def test_preprocessing_is_declared_state_of_every_model(saved):
    path, _ = saved
    assert build_model(TINY).preprocessing is None
    assert build_model(pretrain_config("aim-nano")).preprocessing is None
    assert mlx_aim.load(path).preprocessing == aim_v1_preprocessing(16)
    (path / "preprocess.json").unlink()
    assert mlx_aim.load(path).preprocessing == aim_v1_preprocessing(16)  # the family default


# ---- tensor values ---------------------------------------------------------------------------


def _rewrite_tensor(path, key, value):
    weights = mx.load(str(path))
    mx.save_safetensors(str(path), {**weights, key: value})


def test_nan_weights_are_refused_naming_file_and_tensor(saved):
    path, _ = saved
    key = "trunk.blocks.1.mlp.fc1.weight"
    weights = mx.load(str(path / "model.safetensors"))
    _rewrite_tensor(path / "model.safetensors", key, weights[key] * float("nan"))
    with pytest.raises(WeightsError) as error:
        mlx_aim.load(path)
    assert one_line(error) == (
        f"{path / 'model.safetensors'}: tensor {key!r} holds NaN or infinite values; "
        "the weights are damaged"
    )


def test_nan_in_one_shard_names_that_shard(tmp_path):
    save_model(build_model(TINY), tmp_path / "m", max_shard_bytes=4096)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    key = "trunk.blocks.0.attn.qkv.weight"
    shard = tmp_path / "m" / index["weight_map"][key]
    _rewrite_tensor(shard, key, mx.full((48, 16), float("inf")))
    with pytest.raises(WeightsError, match=f"^{shard}: tensor '{key}' holds NaN"):
        mlx_aim.load(tmp_path / "m")


def test_integer_weights_are_refused_at_load_and_at_convert(saved, tmp_path, monkeypatch):
    path, _ = saved
    key = "trunk.blocks.0.mlp.fc1.weight"
    weights = mx.load(str(path / "model.safetensors"))
    _rewrite_tensor(path / "model.safetensors", key, weights[key].astype(mx.int8))
    message = f"{key}: int8 values for a floating-point parameter \\(quantized"
    with pytest.raises(WeightsError, match=message):
        mlx_aim.load(path)
    register_tiny_architectures(monkeypatch)
    source = write_v2_official_mlx(aim_v2_reference("sincos"), tmp_path / "src")
    weights = mx.load(str(source))
    _rewrite_tensor(source, key, weights[key].astype(mx.int8))
    with pytest.raises(WeightsError, match=message):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- model size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {**TINY, "num_classes": 3, "probe_layers": [1]},
        V2,
        pretrain_config("aim-nano"),
        pretrain_config("aim-nano", head_blocks=0),
    ],
)
def test_parameter_estimate_matches_the_built_model(config):
    built = sum(v.size for _, v in tree_flatten(build_model(config).parameters()))
    assert estimate_parameters(config) == built


@pytest.mark.parametrize(
    "config,key",
    [
        ({**TINY, "num_blocks": 10**9}, "'num_blocks' = 1000000000"),
        (pretrain_config("aim-nano", head_blocks=100_000_000), "'head_blocks' = 100000000"),
        ({**V2, "mlp_hidden_dim": 10**8}, "'mlp_hidden_dim' = 100000000"),
    ],
)
def test_a_model_too_large_for_memory_is_refused_before_it_is_built(config, key):
    with pytest.raises(ConfigError, match=f"more than this machine's .* GiB of memory.*{key}"):
        build_model(config)


def test_a_dimension_mlx_cannot_hold_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="above MLX's limit .*'mlp_hidden_dim' = 10000000000"):
        build_model({**V2, "mlp_hidden_dim": 10**10})


def test_the_size_check_compares_with_this_machines_memory(monkeypatch, saved):
    path, _ = saved
    monkeypatch.setattr(size, "physical_memory", lambda: 2**10)
    with pytest.raises(ConfigError, match="more than this machine's 9.54e-07 GiB"):
        mlx_aim.load(path)


# ---- training checkpoints --------------------------------------------------------------------


def _training_checkpoint(run, step=20):
    config = pretrain_config("aim-nano", head_blocks=1, head_width=32)
    pretrain = build_model(config)
    pretrain.eval()
    arrays = {"model.safetensors": dict(tree_flatten(pretrain.parameters()))}
    state = {
        "config": {},
        "model_config": config,
        "world_size": 1,
        "random_state": [0, 1],
        "loaders": [[0, 0]],
    }
    path = CheckpointStore(run, keep=2, log=print).save(step, arrays, {STATE_FILE: state})
    return path, pretrain


def test_a_training_checkpoint_loads_as_its_trunk(tmp_path):
    run = tmp_path / "runs" / "nano"
    path, pretrain = _training_checkpoint(run)
    spec = aim_v1_preprocessing(32)
    (run / "run.json").write_text(json.dumps({"preprocessing": spec.to_dict()}))
    model = mlx_aim.load(path)
    assert model.args == pretrain.encoder.args and "head" not in model
    assert model.preprocessing == spec
    x = mx.random.normal((2, 32, 32, 3))
    np.testing.assert_array_equal(model(x), pretrain.encoder(x))


def test_a_run_without_its_exported_model_names_its_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    _training_checkpoint(run, step=10)
    latest, _ = _training_checkpoint(run, step=20)
    with pytest.raises(InputError, match=f"no exported model yet .* e.g. {latest}$"):
        mlx_aim.load(run)


def test_a_damaged_training_checkpoint_is_refused(tmp_path):
    path, _ = _training_checkpoint(tmp_path / "run")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged training checkpoint .*sha256"):
        mlx_aim.load(path)


# ---- foreign files ---------------------------------------------------------------------------


def test_a_safetensors_file_named_pth_is_read_as_safetensors(tmp_path, monkeypatch):
    register_tiny_architectures(monkeypatch)
    source = write_v2_official_mlx(aim_v2_reference("sincos"), tmp_path / "src")
    renamed = source.rename(source.with_suffix(".pth"))
    convert(renamed, tmp_path / "out")
    (tmp_path / "out").rename(tmp_path / "out-pth")
    convert(renamed.rename(source), tmp_path / "out")
    for name in ("config.json", "model.safetensors", "preprocess.json"):
        assert (tmp_path / "out-pth" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_torch_user_warnings_do_not_reach_the_user(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pth")
    real_load = torch.load

    def noisy_load(*args, **kwargs):
        warnings.warn("something about storages", UserWarning, stacklevel=2)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", noisy_load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_pth(tmp_path / "w.pth")["w"].tolist() == [1.0, 1.0]
    assert caught == []


def test_a_truncated_safetensors_header_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        mlx_aim.load(path)


def test_an_invalid_source_config_is_one_line(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{'hidden_size': 16}")
    mx.save_safetensors(
        str(folder / "model.safetensors"), {"embeddings.rms_norm.weight": mx.ones(4)}
    )
    with pytest.raises(InputError) as error:
        convert(folder, tmp_path / "out")
    assert one_line(error).startswith(f"{folder / 'config.json'}: invalid JSON (Expecting property")
