"""Checkpoint conversion: every source layout, strictness, unsafe pickles, the CLI and the hub cache."""

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from mlx_aim_cli.main import app
from parity import PARITY_REL, assert_parity, relative_error
from release_files import (
    V1_BEST_LAYERS,
    V1_CONFIG,
    V1_NAME,
    V2_CONFIG,
    V2_NAMES,
    aim_v1_reference,
    aim_v1_with_probe_layers,
    aim_v2_reference,
    images,
    nhwc,
    register_tiny_architectures,
    replace_registry_entry,
    write_v1_release,
    write_v2_mlaim_layout,
    write_v2_official_mlx,
    write_v2_transformers_layout,
)
from typer.testing import CliRunner

import mlx_aim
from mlx_aim.checkpoints.convert import convert
from mlx_aim.checkpoints.hub import HubError
from mlx_aim.checkpoints.weights import WeightsError, read_safetensors
from mlx_aim.errors import OutputError
from mlx_aim.models.base import ConfigError


@pytest.fixture(autouse=True)
def _tiny_registry(monkeypatch):
    register_tiny_architectures(monkeypatch)


def _v1_pth(folder, which):
    reference = aim_v1_reference()
    files = write_v1_release(reference, folder)
    if which == "backbone+head":
        return reference, files["backbone"], {"head": files["last"]}, files["merged"]
    return reference, files["merged"], {}, files["merged"]


def _v2(folder, writer, pos):
    reference = aim_v2_reference(pos)
    written = writer(reference, folder)
    return reference, written, {}, written


SOURCES = {
    "pth-backbone+head": lambda d: _v1_pth(d, "backbone+head"),
    "pth-merged": lambda d: _v1_pth(d, "merged"),
    "mlaim-safetensors": lambda d: _v2(d, write_v2_mlaim_layout, "absolute"),
    "mlx_model-native": lambda d: _v2(d, write_v2_official_mlx, "sincos"),
    "transformers-dir": lambda d: _v2(
        d, lambda r, f: write_v2_transformers_layout(r, f, native=False), "absolute"
    ),
    "transformers-dir-native": lambda d: _v2(
        d, lambda r, f: write_v2_transformers_layout(r, f, native=True), "sincos"
    ),
}


@torch.no_grad()
@pytest.mark.parametrize("kind", SOURCES)
def test_converted_directory_gives_the_outputs_of_the_source(tmp_path, kind):
    reference, source, options, direct_source = SOURCES[kind](tmp_path / "src")
    out = convert(source, tmp_path / "out", **options)

    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocess.json",
    ]
    weights, metadata = read_safetensors(out / "model.safetensors")
    assert metadata == {"format": "mlx"}
    assert weights["preprocessor.patchifier.proj.weight"].shape == (32, 7, 7, 3)
    assert not any(k.endswith("num_batches_tracked") for k in weights)

    converted, direct = mlx_aim.load(out), mlx_aim.load(direct_source)
    assert converted.args == direct.args and converted.preprocessing == direct.preprocessing
    native = converted.args.to_dict().get("pos_embed_type") == "sincos"
    assert converted.preprocessing.native == native  # native models keep their aspect ratio
    size = (28, 42) if native else (28, 28)
    x = images(2, *size, seed=7)
    np.testing.assert_array_equal(converted(nhwc(x)), direct(nhwc(x)))
    assert relative_error(converted(nhwc(x)), reference(x)) <= PARITY_REL


@torch.no_grad()
def test_transformers_pooling_head_gives_the_pooler_output(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Aimv2VisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        use_head=True,
    )
    torch.manual_seed(0)
    reference = transformers.Aimv2VisionModel(config).eval()
    for param in reference.parameters():  # every tensor random: cls token, norms, biases
        param.copy_(torch.randn_like(param) * 0.2 + (1.0 if param.ndim == 1 else 0.0))
    reference.save_pretrained(tmp_path / "hf")
    model = mlx_aim.load(convert(tmp_path / "hf", tmp_path / "out"))
    assert model.args.pooling_head and model.args.num_classes == 0
    pixels = np.random.default_rng(0).normal(size=(2, 3, 28, 28)).astype(np.float32)
    expected = reference(pixel_values=torch.from_numpy(pixels))
    x = mx.array(pixels.transpose(0, 2, 3, 1))
    assert_parity(model.pooled(x), expected.pooler_output, name="pooler_output")
    assert_parity(model(x), expected.last_hidden_state, name="last_hidden_state")


def test_convert_refuses_an_existing_destination_unless_forced(tmp_path):
    _, source, _, _ = _v1_pth(tmp_path / "src", "merged")
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"out already exists \(use --force"):
        convert(source, destination)
    assert (destination / "keep.txt").read_text() == "mine"
    convert(source, destination, force=True)
    assert not (destination / "keep.txt").exists()
    assert mlx_aim.load(destination).args.num_classes == 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left over


MISMATCHES = {
    "missing": (
        lambda sd: sd.pop("trunk.blocks.3.attn.proj.weight"),
        r"missing 1 tensor\(s\): trunk\.blocks\.3\.attn\.proj\.weight \(32, 32\)",
    ),
    "extra": (
        lambda sd: sd.update({"trunk.blocks.0.attn.bias": torch.zeros(32)}),
        r"1 unexpected tensor\(s\): trunk\.blocks\.0\.attn\.bias \(32,\)",
    ),
    "shape": (
        lambda sd: sd.update({"head.k.weight": torch.zeros(32, 16)}),
        r"head\.k\.weight: checkpoint shape \(32, 16\) != model shape \(32, 32\)",
    ),
}


@pytest.mark.parametrize("problem", MISMATCHES)
@pytest.mark.parametrize("arch", [None, V1_NAME])
def test_mismatched_weights_name_the_file_the_key_and_the_shapes(tmp_path, problem, arch):
    state = aim_v1_reference().state_dict()
    change, message = MISMATCHES[problem]
    change(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=rf"^{tmp_path}/bad\.pth: .*{message}"):
        convert(tmp_path / "bad.pth", tmp_path / "out", arch=arch)
    with pytest.raises(WeightsError, match=message):
        mlx_aim.load(tmp_path / "bad.pth")
    assert not (tmp_path / "out").exists()


class _CreatesFile:
    """Unpickling this object writes the file ``path``: a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (shutil.copyfile, (__file__, self.path))


class _CustomObject:
    pass


PICKLE_FORMATS = {  # how to write a payload, and how an unsafe reader would open it
    "torch-zip": (torch.save, lambda path: torch.load(path, weights_only=False)),
    "raw-pickle": (
        lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
        lambda path: pickle.loads(path.read_bytes()),
    ),
}


@pytest.mark.parametrize("kind", PICKLE_FORMATS)
def test_pickled_code_is_refused_and_never_runs(tmp_path, kind):
    write, unsafe_load = PICKLE_FORMATS[kind]
    marker = tmp_path / "payload-ran"
    state = dict(aim_v1_reference().state_dict())
    state["head.bn.num_batches_tracked"] = _CreatesFile(marker)
    write(state, tmp_path / "evil.pth")

    unsafe_load(tmp_path / "evil.pth")  # the payload is real ...
    assert marker.exists()
    marker.unlink()

    with pytest.raises(WeightsError, match=r"evil\.pth: refused: not a plain tensor state dict"):
        convert(tmp_path / "evil.pth", tmp_path / "out")
    with pytest.raises(WeightsError, match="refused"):
        mlx_aim.load(tmp_path / "evil.pth")
    assert not marker.exists()  # ... and mlx-aim never ran it


def test_pickled_custom_classes_are_refused(tmp_path):
    state = {**aim_v1_reference().state_dict(), "extra": _CustomObject()}
    torch.save(state, tmp_path / "custom.pth")
    with pytest.raises(WeightsError, match=r"custom\.pth: refused.*GLOBAL \S*_CustomObject"):
        convert(tmp_path / "custom.pth", tmp_path / "out")


def test_corrupt_pth_is_named_and_refused(tmp_path):
    _, source, _, _ = _v1_pth(tmp_path / "src", "merged")
    (tmp_path / "cut.pth").write_bytes(source.read_bytes()[:-500])
    with pytest.raises(WeightsError, match=r"cut\.pth: not a readable PyTorch file"):
        convert(tmp_path / "cut.pth", tmp_path / "out")


def test_architecture_is_inferred_from_the_registered_shapes(tmp_path):
    _, source, _, _ = _v1_pth(tmp_path / "src", "merged")
    config = json.loads((convert(source, tmp_path / "out") / "config.json").read_text())
    assert {k: config[k] for k in V1_CONFIG} == V1_CONFIG  # heads come from the registry
    assert config["num_classes"] == 10


def test_unregistered_shapes_need_arch(tmp_path):
    reference = aim_v2_reference("absolute")
    state = reference.state_dict()
    # Learned positions for a 42 x 42 image: no registered architecture has 36 positions.
    state["preprocessor.pos_embed"] = torch.randn(1, 36, V2_CONFIG["embed_dim"])
    torch.save(state, tmp_path / "v2-42.pth")
    with pytest.raises(WeightsError, match=r"v2-42\.pth: no registered architecture .*--arch"):
        convert(tmp_path / "v2-42.pth", tmp_path / "out")
    out = convert(tmp_path / "v2-42.pth", tmp_path / "out", arch=V2_NAMES["absolute"])
    model = mlx_aim.load(out)
    assert model.args.image_size == 42 and model.preprocessing.crop == 42
    assert model(nhwc(images(1, 42, 42))).shape == (1, 36, 32)


def test_files_without_a_trunk_are_named(tmp_path):
    files = write_v1_release(aim_v1_reference(), tmp_path)
    with pytest.raises(WeightsError, match=r"head_last_layers\.pth: no 'preprocessor"):
        convert(files["last"], tmp_path / "out")
    with pytest.raises(KeyError, match="unknown model 'aim-9000'"):
        convert(files["backbone"], tmp_path / "out", arch="aim-9000")


def test_probe_layers_must_be_block_indices(tmp_path):
    files = write_v1_release(aim_v1_reference(), tmp_path)
    with pytest.raises(ConfigError, match="probe layers must be 'last', 'best' or block indices"):
        convert(files["merged"], tmp_path / "out", probe_layers="first")
    with pytest.raises(ConfigError, match=r"'probe_layers' \[0, 9\] must name blocks in \[0, 7\)"):
        convert(files["merged"], tmp_path / "out", probe_layers="0,9")
    with pytest.raises(WeightsError, match="--probe-layers was given but the checkpoint has no"):
        convert(files["backbone"], tmp_path / "out", probe_layers="0,1")


# --- the command line -------------------------------------------------------------------------


def _cli(*args):
    result = CliRunner().invoke(app, ["convert", *map(str, args)])
    return result.exit_code, result.output


def test_cli_converts_and_reports_errors_in_one_line(tmp_path):
    files = write_v1_release(aim_v1_reference(), tmp_path / "src")
    out = tmp_path / "out"

    code, output = _cli(files["backbone"], out, "--head", files["best"], "--dtype", "float16")
    assert (code, output) == (0, f"wrote {out}\n")
    model = mlx_aim.load(out)
    assert model.args.probe_layers == list(V1_BEST_LAYERS)
    assert model.trunk.blocks[0].attn.qkv.weight.dtype == mx.float16

    code, output = _cli(files["merged"], out)
    assert code == 3 and output == f"error: {out} already exists (use --force to replace it)\n"

    for args, message in [
        ((tmp_path / "missing.pth", tmp_path / "o2"), "no such file, directory or model name"),
        ((files["last"], tmp_path / "o3"), "not an AIM vision checkpoint"),
        ((files["merged"], tmp_path / "o4", "--arch", "nope"), "unknown model 'nope'"),
        ((files["merged"], tmp_path / "o5", "--probe-layers", "x"), "probe layers must be"),
        ((files["merged"], tmp_path / "o6", "--dtype", "int8"), "--dtype must be"),
    ]:
        code, output = _cli(*args)
        assert code == 1, output
        assert output.startswith("error: ") and output.count("\n") == 1, output
        assert message in output

    code, output = _cli(files["merged"], out, "--force")
    assert code == 0 and mlx_aim.load(out).args.probe_layers is None


def test_cli_refuses_pickled_code_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"w": _CreatesFile(marker)}, tmp_path / "evil.pth")
    code, output = _cli(tmp_path / "evil.pth", tmp_path / "out")
    assert code == 1 and output.count("\n") == 1 and "refused" in output
    assert not marker.exists()


# --- registry names through a local Hugging Face cache ---------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF cache in offline mode (huggingface_hub reads both variables at import)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_files(cache: Path, repo: str, commit: str, files: dict[str, Path], ref=None) -> None:
    """Lay files out as huggingface_hub does: blobs by content hash, snapshot symlinks, refs."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        blob.write_bytes(source.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    if ref is not None:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)


V2_HUB_NAME = "aimv2-large-patch14-224"


@torch.no_grad()
def test_aimv2_name_loads_offline_from_the_pinned_revision(tmp_path, monkeypatch, hub_cache):
    entry = replace_registry_entry(
        monkeypatch, V2_HUB_NAME, {**V2_CONFIG, "pos_embed_type": "absolute"}
    )
    reference = aim_v2_reference("absolute")
    file = write_v2_official_mlx(reference, tmp_path / "download")
    _cache_files(hub_cache, entry.checkpoint.repo, entry.checkpoint.revision, {file.name: file})

    model = mlx_aim.load(V2_HUB_NAME)
    x = images(2, 28, 28, seed=8)
    assert relative_error(model(nhwc(x)), reference(x)) <= PARITY_REL
    assert model.preprocessing == entry.preprocessing

    code, output = _cli(V2_HUB_NAME, tmp_path / "out")
    assert code == 0, output
    np.testing.assert_array_equal(mlx_aim.load(tmp_path / "out")(nhwc(x)), model(nhwc(x)))


def test_a_snapshot_of_another_revision_is_not_used(tmp_path, monkeypatch, hub_cache):
    entry = replace_registry_entry(
        monkeypatch, V2_HUB_NAME, {**V2_CONFIG, "pos_embed_type": "absolute"}
    )
    file = write_v2_official_mlx(aim_v2_reference("absolute"), tmp_path / "download")
    _cache_files(hub_cache, entry.checkpoint.repo, "f" * 40, {file.name: file}, ref="main")
    with pytest.raises(HubError, match=f"@{entry.checkpoint.revision} is not in the local"):
        mlx_aim.load(V2_HUB_NAME)


@torch.no_grad()
def test_aimv1_name_loads_backbone_and_best_head_from_main(tmp_path, monkeypatch, hub_cache):
    entry = replace_registry_entry(monkeypatch, "aim-600M", V1_CONFIG, best_layers=V1_BEST_LAYERS)
    reference = aim_v1_reference()
    files = write_v1_release(reference, tmp_path / "download")
    ckpt = entry.checkpoint
    cached = {ckpt.files[0]: files["backbone"], ckpt.head_files["best"]: files["best"]}
    _cache_files(hub_cache, ckpt.repo, "a" * 40, cached, ref="main")

    model = mlx_aim.load("aim-600M", head="best")
    assert model.args.probe_layers == list(V1_BEST_LAYERS)
    x = images(2, 28, 42, seed=9)
    expected = aim_v1_with_probe_layers(reference, V1_BEST_LAYERS)(x)
    assert relative_error(model(nhwc(x)), expected) <= PARITY_REL
    assert "head" not in mlx_aim.load("aim-600M")  # no head asked for: the trunk alone

    with pytest.raises(HubError, match="head_last_layers.pth is not in the local"):
        mlx_aim.load("aim-600M", head="last")
    with pytest.raises(WeightsError, match=r"no released probe head '0,1' \(released: last, best"):
        mlx_aim.load("aim-600M", head="0,1")


def test_missing_hub_files_say_how_to_download_them(hub_cache):
    revision = mlx_aim.REGISTRY["aimv2-huge-patch14-224"].checkpoint.revision
    with pytest.raises(HubError) as error:
        mlx_aim.load("aimv2-huge-patch14-224")
    message = str(error.value)
    assert "\n" not in message
    assert (
        f"`hf download apple/aimv2-huge-patch14-224 mlx_model.safetensors --revision {revision}`"
        in message
    )
    code, output = _cli("aimv2-huge-patch14-224", hub_cache.parent / "out")
    assert code == 1 and output.count("\n") == 1 and "hf download" in output


def test_convert_never_replaces_its_own_source(tmp_path):
    _, source, _, _ = _v1_pth(tmp_path / "src", "merged")
    first = tmp_path / "converted"
    assert _cli(source, first)[0] == 0
    before = {p: p.read_bytes() for p in first.iterdir()}
    for destination in (first, tmp_path, first / "inner"):
        code, output = _cli(first, destination, "--force")
        assert code == 3 and "which this command reads" in output, output
    assert {p: p.read_bytes() for p in first.iterdir()} == before
