"""``mlx-aim train --objective lit``: a frozen AIMv2 trunk and captions in, a LiT model out that
``mlx_aim.load``, ``zero-shot`` (and ``--eval``) and ``embed --text`` use like the release."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from configs import TINY_AIMV2_TRUNK
from mlx.utils import tree_flatten
from mlx_aim_cli.main import app
from PIL import Image
from typer.testing import CliRunner

import mlx_aim
from mlx_aim.checkpoints.weights import save_model
from mlx_aim.errors import InputError, OutputError
from mlx_aim.models import build_model
from mlx_aim.models.aim_v2_lit import l2_normalize
from mlx_aim.tasks import features
from mlx_aim.tasks.features import preprocess
from mlx_aim.tasks.zero_shot import evaluate, label_embeddings
from mlx_aim.train import TrainConfig, train

pytest.importorskip("tokenizers")

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
TEXT = dict(text_width=32, text_depth=1, text_heads=2, projection_dim=16, context_length=12)


def _image(rng, colour) -> Image.Image:
    pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 30, (16, 16, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A saved tiny AIMv2 trunk; 24 captioned colour images; 9 images in colour folders."""
    root = tmp_path_factory.mktemp("lit")
    save_model(build_model(TINY_AIMV2_TRUNK), root / "trunk")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(24):
        name = list(COLOURS)[i % 3]
        _image(rng, name).save(root / "images" / f"{i:02d}.png")
        (root / "images" / f"{i:02d}.txt").write_text(f"a {name} square")
    for i in range(9):
        folder = root / "eval" / (["dark_red", "green", "blue"][i % 3])
        folder.mkdir(parents=True, exist_ok=True)
        _image(rng, list(COLOURS)[i % 3]).save(folder / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Feature caches in tmp_path (not MLX_AIM_CACHE: the native kernels are cached there)."""
    monkeypatch.setattr(features, "default_cache_dir", lambda: tmp_path / "cache")


def config(data, output, **changes) -> TrainConfig:
    values = dict(
        objective="lit",
        model=str(data / "trunk"),
        data=str(data / "images"),
        output=str(output),
        steps=6,
        batch_size=8,
        lr=3e-3,
        vocab_size=300,
        checkpoint_every=3,
        val_every=3,
        val_images=8,
        val_fraction=0.25,
        workers=0,
        quiet=True,
        **TEXT,
    )
    return TrainConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def lit_run(data, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "lit"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "default_cache_dir", lambda: output.parent / "cache")
        result = train(config(data, output, steps=12))
    return output, result


def test_a_run_exports_a_lit_model_with_the_trunk_frozen(data, lit_run):
    output, result = lit_run
    assert result.step == 12 and result.final_loss < result.initial_loss
    model = mlx_aim.load(str(output))
    assert model.args.model_type == "aim_v2_lit" and model.tokenizer is not None
    trunk = mlx_aim.load(str(data / "trunk"))
    theirs = dict(tree_flatten(trunk.parameters()))
    ours = dict(tree_flatten(model.image_encoder.parameters()))
    assert all(mx.array_equal(ours[k], v) for k, v in theirs.items())  # frozen
    assert model.args.eos_token_id == model.tokenizer.eos_id
    records = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    assert all(0 <= r["accuracy"] <= 1 for r in records if r["split"] == "train")
    assert any(r["split"] == "val" and "accuracy" in r for r in records)
    assert (output / "loss.png").is_file()


def test_the_folder_works_in_zero_shot_and_embed_text(data, lit_run):
    output, _ = lit_run
    runner = CliRunner()
    image = str(data / "images" / "00.png")
    shot = runner.invoke(
        app, ["zero-shot", "-m", str(output), image, "-l", "red,green,blue", "--json"]
    )
    assert shot.exit_code == 0, shot.output
    assert sorted(json.loads(shot.stdout)["labels"]) == ["blue", "green", "red"]
    text = runner.invoke(app, ["embed", "-m", str(output), "--text", "a red square"])
    assert text.exit_code == 0, text.output
    assert "shape (16,)" in text.stdout
    pooled = runner.invoke(app, ["embed", "-m", str(output), "--pool", "projection", image])
    assert pooled.exit_code == 0, pooled.output


def test_zero_shot_eval_matches_a_direct_computation(data, lit_run):
    output, _ = lit_run
    model = mlx_aim.load(str(output))
    prompts = {"dark_red": "red"}  # the folder dark_red is labelled "red"
    result = evaluate(model, data / "eval", ["a {} square"], prompts=prompts)
    folders = sorted(p for p in (data / "eval").iterdir())
    labels = [prompts.get(f.name, f.name.replace("_", " ")) for f in folders]
    text = label_embeddings(model, labels, ["a {} square"])
    paths = [(c, p) for c, f in enumerate(folders) for p in sorted(f.iterdir())]
    image = np.array(l2_normalize(model.encode_image(preprocess(model, [p for _, p in paths]))))
    predicted = (image @ text.T).argmax(axis=1)
    truth = np.array([c for c, _ in paths])
    assert result.top1 == pytest.approx(float((predicted == truth).mean()))
    for c, folder in enumerate(folders):
        assert result.per_class[folder.name] == pytest.approx((predicted == c)[truth == c].mean())
    assert result.top5 is None  # 3 classes
    assert result.labels["dark_red"] == "red" and result.images == 9

    (data / "labels.txt").write_text("dark_red: red\n")
    cli = CliRunner().invoke(
        app,
        ["zero-shot", "-m", str(output), "--eval", str(data / "eval"), "--labels-file",
         str(data / "labels.txt"), "--template", "a {} square", "--json"],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout)
    assert printed["top1"] == pytest.approx(result.top1) and printed["top5"] is None
    assert printed["per_class"] == pytest.approx(result.per_class)


def test_zero_shot_eval_names_a_labels_file_folder_that_is_missing_and_an_empty_class(
    data, lit_run, tmp_path
):
    output, _ = lit_run
    labels = tmp_path / "labels.txt"
    labels.write_text("dark_red: red\npurple: purple\n")
    args = ["zero-shot", "-m", str(output), "--eval"]
    cli = CliRunner().invoke(app, [*args, str(data / "eval"), "--labels-file", str(labels)])
    assert cli.exit_code == 1, cli.output
    assert cli.output == f"error: {labels}: no class folder 'purple' in {data / 'eval'}\n"
    folders = shutil.copytree(data / "eval", tmp_path / "eval")
    (folders / "purple").mkdir()
    cli = CliRunner().invoke(app, [*args, str(folders), "--json"])
    assert cli.exit_code == 0, cli.output
    assert f"warning: {folders}/purple: no readable images" in cli.stderr
    assert json.loads(cli.stdout)["labels"]["purple"] == "purple"


def test_zero_shot_eval_blames_a_tokenizer_larger_than_the_text_tower_not_the_folder(
    data, lit_run, tmp_path
):
    output, _ = lit_run
    model = shutil.copytree(output, tmp_path / "model")
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab.update({f"extra{i}": len(vocab) + i for i in range(400)})
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    cli = CliRunner().invoke(app, ["zero-shot", "-m", str(model), "--eval", str(data / "eval")])
    assert cli.exit_code == 1, cli.output
    assert cli.output.startswith(f"error: {model / 'tokenizer.json'}: token ")
    assert "does not match the model" in cli.output and "Traceback" not in cli.output


def test_an_image_without_caption_is_skipped_as_such_not_as_unreadable(data, tmp_path):
    images = shutil.copytree(data / "images", tmp_path / "images")
    (images / "05.txt").unlink()
    result = train(TrainConfig(**{**config(data, tmp_path / "run").to_dict(), "data": str(images)}))
    assert result.skipped_files == [str(images / "05.png")]
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"skipping {images / '05.png'}: no caption" in log and "unreadable image" not in log


def test_a_run_never_writes_into_the_trunk_or_the_text_init_it_reads(data, lit_run, tmp_path):
    output, _ = lit_run
    text_init = shutil.copytree(output, tmp_path / "text-init")
    before = sorted(p.name for p in text_init.iterdir())
    for target, changes in [
        (data / "trunk", {}),
        (text_init / "run", {"text_init": str(text_init)}),
    ]:
        with pytest.raises(OutputError, match="which this command reads"):
            train(config(data, target, **changes))
    assert sorted(p.name for p in text_init.iterdir()) == before
    assert sorted(p.name for p in (data / "trunk").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_a_stopped_run_resumes_to_the_same_weights(data, tmp_path):
    train(config(data, tmp_path / "run"))
    checkpoints = tmp_path / "run" / "checkpoints"
    reference = mx.load(str(checkpoints / "step-00000006" / "model.safetensors"))
    shutil.rmtree(checkpoints / "step-00000006")  # as if the run had stopped after step 3
    result = train(config(data, tmp_path / "run"))
    assert result.resumed_from == 3
    resumed = mx.load(str(checkpoints / "step-00000006" / "model.safetensors"))
    assert all(mx.array_equal(resumed[k], reference[k]) for k in reference)


def test_an_unreadable_image_is_named_and_skipped(data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(data / "images", images)
    (images / "broken.png").write_bytes(b"not an image")
    (images / "broken.txt").write_text("a broken square")
    settings = config(data, tmp_path / "run", steps=2)
    settings.data = str(images)
    result = train(settings)
    assert result.skipped_files == [str(images / "broken.png")]
    assert "broken.png" in (tmp_path / "run" / "train.log").read_text()


def test_without_the_feature_cache_the_run_trains_the_same(data, tmp_path):
    cached = train(config(data, tmp_path / "cached", steps=3))
    live = train(config(data, tmp_path / "live", steps=3, feature_cache=False))
    assert live.final_loss == pytest.approx(cached.final_loss, rel=2e-3)  # float16 cache


def test_text_init_starts_the_text_side_from_a_lit_model(data, lit_run, tmp_path):
    output, _ = lit_run
    run = tmp_path / "run"
    result = train(config(data, run, steps=1, text_init=str(output), lr=1e-9, min_lr=0.0))
    start = dict(tree_flatten(mlx_aim.load(str(output)).text_encoder.parameters()))
    tuned = dict(tree_flatten(result.model.text_encoder.parameters()))
    assert all(np.allclose(np.array(tuned[k]), np.array(v), atol=1e-6) for k, v in start.items())
    assert (run / "tokenizer.json").read_text() == (output / "tokenizer.json").read_text()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": None}, "--objective lit needs --model TRUNK"),
        ({"model": "aim-nano"}, "LiT trains against an AIMv2 trunk"),
        ({"text_heads": 5}, "--text-width .* multiple of --text-heads"),
        ({"probe_data": "x"}, "--probe-data: not with --objective lit"),
        ({"tokenizer": "tokenizer.json"}, "--tokenizer: not with --objective lit"),
    ],
)
def test_unusable_settings_name_the_flag(data, tmp_path, changes, message):
    with pytest.raises(InputError, match=message):
        train(config(data, tmp_path / "run", **changes))


DISTRIBUTED_SCRIPT = """
import json
import sys
from pathlib import Path
import mlx_aim
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_aim.tasks import features
from mlx_aim.train import TrainConfig, train

values, output, cache = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
features.default_cache_dir = lambda: cache
result = train(TrainConfig(**{**values, "output": output}))
rank = mx.distributed.init().rank() if mx.distributed.is_available() else 0
mx.save_safetensors(f"{output}-rank{rank}.safetensors", dict(tree_flatten(result.model.parameters())))
"""


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="needs mlx.launch")
def test_two_processes_train_as_one_with_global_negatives(data, tmp_path):
    import subprocess
    import sys

    from test_train_distributed import LAUNCH, ROOT, free_port

    values = config(data, tmp_path / "unused", steps=3, val_every=0).to_dict()
    values.pop("output")
    script = tmp_path / "run.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    args = [str(script), json.dumps(values)]
    one = subprocess.run(
        [sys.executable, *args, str(tmp_path / "one"), str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    launch = [LAUNCH, "-n", "2", "--starting-port", str(free_port()), "--", sys.executable]
    two = subprocess.run(
        [*launch, *args, str(tmp_path / "two"), str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout + two.stderr
    single = mx.load(str(tmp_path / "one-rank0.safetensors"))
    for rank in (0, 1):
        ranked = mx.load(str(tmp_path / f"two-rank{rank}.safetensors"))
        worst = max(mx.abs(single[k] - ranked[k]).max().item() for k in single)
        # float32 rounding of the reductions, amplified by Adam where a gradient is near zero;
        # local negatives instead of global ones move the weights by about lr (3e-3) per step
        assert worst <= 1e-4, (rank, worst)


def test_the_folder_converts_and_loads_like_the_release(lit_run, tmp_path):
    output, _ = lit_run
    done = CliRunner().invoke(app, ["convert", str(output), str(tmp_path / "converted")])
    assert done.exit_code == 0, done.output
    original, converted = mlx_aim.load(str(output)), mlx_aim.load(str(tmp_path / "converted"))
    ids = original.tokenizer(["a red square", "a blue square"])
    assert mx.array_equal(converted.tokenizer(["a red square", "a blue square"]), ids)
    assert mx.array_equal(converted.encode_text(ids), original.encode_text(ids))


def test_a_stop_signal_ends_the_feature_caching_at_once(data, tmp_path):
    import signal

    from mlx_aim.errors import Interrupted
    from mlx_aim.train.distributed import World
    from mlx_aim.train.lit import LitPlan
    from mlx_aim.train.stopping import StopSignals

    stop = StopSignals(enabled=False)
    stop.requested = signal.SIGTERM
    with pytest.raises(Interrupted, match="while caching") as stopped:
        LitPlan(config(data, tmp_path / "run"), World(), stop)
    assert stopped.value.exit_code == 143
    assert not list((tmp_path / "cache").glob("*.json"))  # no half-written cache entry
