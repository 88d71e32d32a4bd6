"""Embeddings: order and names, batching, pooling, output formats, bad files, the CLI."""

import errno
import json
import os
import stat
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_V1, TINY_V2
from image_corpus import make_corpus, noise
from mlx_aim_cli.main import app
from PIL import Image
from typer.testing import CliRunner

from mlx_aim.checkpoints.registry import aim_v1_preprocessing, aim_v2_preprocessing
from mlx_aim.checkpoints.weights import save_model
from mlx_aim.models import build_model
from mlx_aim.tasks.embed import (
    Embedder,
    embed_images,
    load_embeddings,
    paths_file,
    pooling,
    quantize,
    save_embeddings,
)
from mlx_aim.tasks.features import layer_average, preprocess

V1 = {**TINY_V1, "embed_dim": 64}
V2_NATIVE = {**TINY_V2, "num_blocks": 1, "pos_embed_type": "sincos"}


def tiny(config=V1, prep=None):
    mx.random.seed(0)
    model = build_model(config)
    model.eval()
    model.preprocessing = prep or aim_v1_preprocessing(config["image_size"])
    return model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate([(40, 30), (28, 28), (50, 64), (33, 33), (29, 60)]):
        paths.append(root / f"img{i}.png")
        noise(w, h, seed=i).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(
        tiny(), tmp_path_factory.mktemp("m") / "model", preprocessing=tiny().preprocessing
    )


def test_batched_results_match_single_images_and_keep_the_order(images):
    model = tiny()
    shuffled = [images[i] for i in (3, 0, 4, 1, 2)]
    batched = Embedder(model, batch_size=2).embed_files(shuffled, num_workers=2)
    assert batched.paths == [str(p) for p in shuffled] and not batched.errors
    singles = np.concatenate([embed_images(model, p, batch_size=1) for p in shuffled])
    np.testing.assert_allclose(batched.embeddings, singles, atol=1e-5)
    # one padded batch of 8 for five images, PIL and array inputs give the same numbers
    pil = [Image.open(p) for p in shuffled]
    np.testing.assert_allclose(embed_images(model, pil, batch_size=8), singles, atol=1e-5)
    arrays = [np.asarray(img.convert("RGB")) for img in pil]
    np.testing.assert_allclose(embed_images(model, arrays), singles, atol=1e-5)


def test_preprocessed_batches_may_be_nchw(images):
    model = tiny()
    x = np.array(preprocess(model, images[:3]))
    nhwc = embed_images(model, x)
    np.testing.assert_allclose(embed_images(model, x.transpose(0, 3, 1, 2)), nhwc, atol=1e-6)
    np.testing.assert_allclose(embed_images(model, images[:3]), nhwc, atol=1e-6)


def test_poolings(images):
    model = tiny()
    x = preprocess(model, images[:2])
    tokens = embed_images(model, x, pool="tokens")
    assert tokens.shape == (2, 16, 64)
    np.testing.assert_allclose(tokens, np.array(model.encode(x)), atol=1e-5)
    np.testing.assert_allclose(embed_images(model, x, pool="mean"), tokens.mean(1), atol=1e-5)
    default = embed_images(model, x)  # AIMv1 default: token mean of averaged block outputs
    np.testing.assert_allclose(
        default, np.array(layer_average(model, x, [0, 1]).mean(1)), atol=1e-5
    )
    first = embed_images(model, x, pool="layers", layers=[0])
    assert not np.allclose(first, default)
    unit = embed_images(model, x, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, default / np.linalg.norm(default, axis=1)[:, None], atol=1e-5)
    with pytest.raises(ValueError, match="no classifier head"):
        pooling(model, "head")

    classifier = tiny(V1 | {"num_classes": 5})
    pooled = embed_images(classifier, x)
    assert pooled.shape == (2, 64)
    expected = classifier.head.pool(classifier.probe_features(x))
    np.testing.assert_allclose(pooled, np.array(expected), atol=1e-5)


def test_native_resolution_keeps_the_aspect_ratio(tmp_path):
    model = tiny(V2_NATIVE, aim_v2_preprocessing(28, native=True))
    wide, square = tmp_path / "wide.png", tmp_path / "square.png"
    noise(56, 28, seed=1).save(wide)
    noise(30, 30, seed=2).save(square)  # padded to 42 x 42: 3 x 3 patches
    result = Embedder(model, pool="tokens").embed_files([wide, square])
    assert [t.shape for t in result.embeddings] == [(2 * 4, 32), (3 * 3, 32)]
    pooled = embed_images(model, [wide, square])
    np.testing.assert_allclose(pooled, np.stack([t.mean(0) for t in result.embeddings]), atol=1e-5)
    out = tmp_path / "tokens.jsonl"
    save_embeddings(out, result.embeddings, result.paths)
    loaded, paths = load_embeddings(out)
    assert paths == result.paths and all(
        np.array_equal(a, b) for a, b in zip(loaded, result.embeddings, strict=True)
    )
    with pytest.raises(ValueError, match="jsonl"):
        save_embeddings(tmp_path / "tokens.npy", result.embeddings, result.paths)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".jsonl"])
def test_every_output_format_round_trips(tmp_path, suffix):
    vectors = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    names = ["b.png", "dir with space/a.jpg", "ünïcode.png"]
    written = save_embeddings(tmp_path / f"out{suffix}", vectors, names)
    loaded, paths = load_embeddings(tmp_path / f"out{suffix}")
    assert paths == names and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    if suffix == ".npy":
        assert paths_file(tmp_path / "out.npy").name == "out.paths.txt"


def test_eight_bit_quantization_keeps_embeddings_close(images):
    model = tiny()
    reference = embed_images(model, images)
    assert quantize(model, 8) == 2 * 4  # qkv, proj, fc1, fc2 in each block
    quantized = embed_images(model, images)
    cosine = (reference * quantized).sum(1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1)
    )
    assert cosine.min() > 0.999 and not np.array_equal(reference, quantized)


def run(args, **kwargs):
    return CliRunner().invoke(app, ["embed", *map(str, args)], **kwargs)


def test_cli_reports_bad_files_and_writes_the_rest(tmp_path, model_dir):
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "emb.npy"
    result = run([tmp_path / "corpus", "--model", model_dir, "-o", out, "-b", "4"])
    assert result.exit_code == 4, result.output  # partial: some inputs skipped
    lines = result.stderr.strip().splitlines()
    for bad, reason in corpus["bad"].items():
        hits = [line for line in lines if line.startswith(f"skipped {bad}:")]
        assert len(hits) == 1 and reason in hits[0], (bad, lines)
    embeddings, paths = load_embeddings(out)
    assert sorted(paths) == sorted(str(p) for p in corpus["good"])
    assert embeddings.shape == (len(corpus["good"]), 64)
    np.testing.assert_allclose(embeddings[:2], embed_images(tiny(), paths[:2]), atol=1e-5)
    assert lines[-1] == f"{len(corpus['bad'])} unreadable files skipped"


def test_cli_one_skipped_file_is_named_in_the_singular(images, tmp_path, model_dir):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    result = run([images[0], tmp_path / "bad.png", "--model", model_dir, "-o", tmp_path / "e.npy"])
    assert result.exit_code == 4, result.output
    assert result.stderr.strip().splitlines()[-1] == "1 unreadable file skipped"
    assert "wrote 1 embedding (layers pooling)" in result.stderr


def test_cli_reads_paths_from_stdin_in_order_and_prints_summaries(images, model_dir):
    order = [images[2], images[0], images[4]]
    stdin = "".join(f"{p}\n" for p in order)
    result = run(["-", "--model", model_dir], input=stdin)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert [line.split("  ")[0] for line in lines] == [str(p) for p in order]
    assert all("shape (64,)" in line and "norm" in line for line in lines)

    result = run([images[1], "--model", model_dir, "--json", "--normalize"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["path"] == str(images[1]) and len(row["embedding"]) == 64
    assert np.linalg.norm(row["embedding"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".jsonl"])
def test_cli_outputs_match_the_python_api(images, model_dir, tmp_path, suffix):
    out = tmp_path / f"e{suffix}"
    result = run([*images, "--model", model_dir, "-o", out, "--pool", "mean", "-b", "2"])
    assert result.exit_code == 0, result.output
    embeddings, paths = load_embeddings(out)
    assert paths == [str(p) for p in images]
    np.testing.assert_allclose(embeddings, embed_images(tiny(), images, pool="mean"), atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--pool", "max"],
            "--pool must be one of auto, mean, head, layers, tokens, projection, not 'max'",
        ),
        (["--pool", "mean", "--layers", "0"], "--layers only applies to --pool layers"),
        (["--pool", "head"], "no classifier head"),
        (["--layers", "7"], "block 7 does not exist"),
        (["-o", "out.csv"], "unknown output format"),
        (["--quantize", "3"], "--quantize must be 4 or 8"),
        (["--dtype", "int8"], "--dtype must be one of"),
    ],
)
def test_cli_bad_options_are_one_line_with_exit_code_1(images, model_dir, args, message):
    result = run([images[0], "--model", model_dir, *args])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_cli_nothing_readable_is_exit_code_1(tmp_path, model_dir):
    (tmp_path / "a.png").write_bytes(b"not a png")
    result = run([tmp_path / "a.png", tmp_path / "missing.png", "--model", model_dir])
    assert result.exit_code == 1
    assert "not an image" in result.stderr and "file not found" in result.stderr
    assert result.stderr.endswith("error: none of the files could be read as an image\n")
    assert not list(Path(tmp_path).glob("*.npy"))


# --- outputs: never clobbered, checked before the work, complete or absent -------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_cli_refuses_an_existing_output_without_force_and_replaces_it_with(
    images, model_dir, tmp_path
):
    out = tmp_path / "emb.npy"
    assert run([images[0], "--model", model_dir, "-o", out]).exit_code == 0
    before = _files(tmp_path)

    result = run([*images[:2], "--model", model_dir, "-o", out])
    assert result.exit_code == 3
    assert (
        result.stderr
        == f"error: {tmp_path / 'emb.paths.txt'} already exists (use --force to replace it)\n"
    )
    assert _files(tmp_path) == before

    result = run([*images[:2], "--model", model_dir, "-o", out, "--force"])
    assert result.exit_code == 0, result.output
    assert load_embeddings(out)[1] == [str(p) for p in images[:2]]
    assert sorted(_files(tmp_path)) == ["emb.npy", "emb.paths.txt"]  # no temporary files


@pytest.mark.parametrize(
    "model, target",
    [(".", "model.safetensors"), (".", "new/emb.npy"), ("model.safetensors", "model.safetensors")],
)
def test_cli_never_writes_into_the_model_being_read(images, model_dir, model, target):
    before = _files(model_dir)
    args = [images[0], "--model", model_dir / model, "-o", model_dir / target, "--force"]
    result = run(args)
    assert result.exit_code == 3
    assert "inside the model" in result.stderr and result.stderr.count("\n") == 1
    assert _files(model_dir) == before


def test_cli_refuses_a_directory_as_the_output_file(images, model_dir, tmp_path):
    (tmp_path / "out.npy").mkdir()
    for force in ([], ["--force"]):
        result = run([images[0], "--model", model_dir, "-o", tmp_path / "out.npy", *force])
        assert result.exit_code == 3, result.output
        assert (
            result.stderr
            == f"error: {tmp_path / 'out.npy'} is a directory; refusing to replace it with the output\n"
        )
    assert [p.name for p in tmp_path.iterdir()] == ["out.npy"]  # no .paths.txt written


def test_cli_refuses_paths_a_npy_listing_cannot_hold_before_loading_the_model(
    images, tmp_path, monkeypatch
):
    odd = tmp_path / "two\nlines.png"
    odd.write_bytes(images[0].read_bytes())
    monkeypatch.setattr("mlx_aim.load", lambda *a, **k: pytest.fail("model loaded"))
    result = run([images[0], odd, "-o", tmp_path / "e.npy"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "has a line break" in result.stderr
    assert "write .safetensors or .jsonl instead" in result.stderr


def test_paths_that_are_not_utf8_round_trip_through_npy(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name on a UTF-8 system
    save_embeddings(tmp_path / "e.npy", np.zeros((2, 3), np.float32), [name, "b.png"])
    assert load_embeddings(tmp_path / "e.npy")[1] == [name, "b.png"]


def test_cli_checks_the_destination_is_writable_before_the_work(
    images, model_dir, tmp_path, monkeypatch
):
    # chmod does not stop root (the suite may run as root): deny through os.access instead
    folder = tmp_path / "locked"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        "mlx_aim.io.os.access", lambda p, mode: Path(p) != folder and real_access(p, mode)
    )
    monkeypatch.setattr("mlx_aim.load", lambda *a, **k: pytest.fail("model loaded"))
    result = run([images[0], "--model", model_dir, "-o", folder / "e.npy"])
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: cannot write {folder / 'e.paths.txt'}: ")
    assert result.stderr.count("\n") == 1 and "permission denied" in result.stderr


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".jsonl"])
def test_cli_a_failed_write_is_one_line_and_leaves_the_old_pair_intact(
    images, model_dir, tmp_path, monkeypatch, suffix
):
    out = tmp_path / f"e{suffix}"
    assert run([images[0], "--model", model_dir, "-o", out]).exit_code == 0
    before = _files(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mlx_aim.io.os.replace", full_disk)
    result = run([*images[:3], "--model", model_dir, "-o", out, "--force"])
    assert result.exit_code == 3
    assert result.stderr == f"error: cannot write {_first_file(out)}: no space left on the device\n"
    assert _files(tmp_path) == before  # old files untouched, no temporary file left


def _first_file(out: Path) -> Path:
    return paths_file(out) if out.suffix == ".npy" else out


def test_cli_writes_with_the_users_umask_and_quiet_prints_nothing(images, model_dir, tmp_path):
    old = os.umask(0o027)
    try:
        result = run([images[0], "--model", model_dir, "-o", tmp_path / "e.npy", "-q"])
    finally:
        os.umask(old)
    assert result.exit_code == 0 and result.output == ""
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o640}


def test_cli_warns_that_half_precision_is_slow_on_a_cpu(images, model_dir):
    result = run([images[0], "--model", model_dir, "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    slow = mx.default_device().type == mx.cpu
    assert ("9-15x slower than float32" in result.stderr) == slow
    assert "9-15x slower than float32" in run(["--help"], env={"COLUMNS": "200"}).stdout
