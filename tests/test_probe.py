"""Probing: learning, exact BatchNorm statistics, saving as a classifier, torch parity of
--eval-only, the feature cache, the CLI (flags, outputs, errors)."""

import json

import configs
import mlx.core as mx
import numpy as np
import pytest
import skimage.data
import torch
from image_corpus import make_corpus
from mlx_aim_cli.main import app
from parity import assert_parity
from PIL import Image
from typer.testing import CliRunner

import mlx_aim
from mlx_aim.checkpoints.registry import aim_v1_preprocessing, default_preprocessing, resolve_layers
from mlx_aim.checkpoints.weights import apply_weights, save_model
from mlx_aim.data.transforms import Preprocessing
from mlx_aim.errors import InputError, OutputError
from mlx_aim.models import build_model
from mlx_aim.models.aim_v1 import ModelArgs as V1Args
from mlx_aim.reference.torch_aim import AIMv1Torch, init_random_
from mlx_aim.tasks.features import FeatureCache
from mlx_aim.tasks.probe import (
    Hooks,
    ProbeConfig,
    check_classes,
    compute_features,
    load_dataset,
    random_model,
    save_probe,
    train_probe,
)

TINY = configs.TINY_V1
TINY_V2 = {**configs.TINY_V2, "patch_size": 7}
COLORS = {"red": 0, "green": 1, "blue": 2}
TEXTURES = ("brick", "grass", "gravel", "moon", "camera")  # grey images shipped with scikit-image


def write_colour_dataset(root, train_per_class=20, val_per_class=6, seed=0):
    """Noise images whose dominant channel is the class: separable, but not pixel-identical."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, channel in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (30, 34, 3))
                pixels[..., channel] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def write_texture_dataset(root, train_per_class=40, val_per_class=15, size=64, seed=0):
    """Real photographs as classes: random crops of scikit-image's texture and scene images."""
    rng = np.random.default_rng(seed)
    for name in TEXTURES:
        pixels = getattr(skimage.data, name)()
        height, width = pixels.shape[:2]
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                y, x = rng.integers(0, height - size), rng.integers(0, width - size)
                Image.fromarray(pixels[y : y + size, x : x + size]).save(folder / f"{i}.png")
    return root


def tiny_trunk(seed=0, config=TINY):
    mx.random.seed(seed)
    model = build_model(config)
    model.eval()
    model.preprocessing = default_preprocessing(config)
    return model


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return write_colour_dataset(tmp_path_factory.mktemp("colours"))


def config(tmp_path, **overrides):
    settings = dict(epochs=12, batch_size=16, lr=3e-3, warmup_epochs=0.5)
    settings.update(overrides)
    return ProbeConfig(cache_dir=str(tmp_path / "cache"), workers=0, **settings)


@pytest.mark.parametrize(
    "trunk, head", [(TINY, "attentive"), (TINY, "linear"), (TINY_V2, "attentive")]
)
def test_probe_learns_a_separable_task(colour_data, tmp_path, trunk, head):
    data = load_dataset(colour_data)
    result = train_probe(tiny_trunk(config=trunk), data, config(tmp_path, head=head))
    epochs = result.report["epochs"]
    assert len(epochs) == 12 and epochs[-1]["loss"] < epochs[0]["loss"]
    assert result.report["final"]["top1"] >= 0.95
    assert result.report["final"]["top5"] == 1.0  # only 3 classes: top-5 is capped at top-3
    assert result.report["num_train"] == 60 and result.report["num_val"] == 18


def test_saved_probe_loads_as_the_full_classifier(colour_data, tmp_path):
    data = load_dataset(colour_data)
    result = train_probe(tiny_trunk(), data, config(tmp_path, epochs=2, layers="0,-1"))
    out = save_probe(result, tmp_path / "probe")
    loaded = mlx_aim.load(out)
    assert loaded.args.num_classes == 3 and loaded.args.probe_layers == [0, 1]
    assert loaded.args.head == "attentive"
    assert json.loads((out / "classes.json").read_text()) == ["blue", "green", "red"]
    assert json.loads((out / "probe_report.json").read_text())["layers"] == [0, 1]
    x = mx.random.normal((4, 28, 28, 3))
    np.testing.assert_allclose(np.array(loaded(x)), np.array(result.model(x)), atol=1e-5)
    with pytest.raises(OutputError, match="already exists"):
        save_probe(result, out)


def test_cached_features_equal_recomputed_ones(colour_data, tmp_path):
    model, data = tiny_trunk(), load_dataset(colour_data)
    cfg = config(tmp_path, batch_size=7)  # 18 images: the last batch is padded
    first, hit_first = compute_features(model, data.val, [0, 1], cfg, Hooks(), "val")
    again, hit_again = compute_features(model, data.val, [0, 1], cfg, Hooks(), "val")
    fresh, _ = compute_features(model, data.val, [0, 1], config(tmp_path, cache=False), Hooks(), "")
    assert (hit_first, hit_again) == (False, True)
    assert again.features.dtype == np.float16 and fresh.features.dtype == np.float32
    np.testing.assert_array_equal(again.features, first.features)
    # float16 keeps 11 significant bits; BLAS threading may move float32 results by an ulp
    np.testing.assert_allclose(again.features, fresh.features, rtol=2**-10, atol=1e-6)
    np.testing.assert_array_equal(again.labels, fresh.labels)
    assert again.paths == fresh.paths == [str(p) for p, _ in data.val]
    # other layers, other weights or a changed file are different cache entries
    assert not compute_features(model, data.val, [1], cfg, Hooks(), "")[1]
    assert not compute_features(tiny_trunk(seed=1), data.val, [0, 1], cfg, Hooks(), "")[1]
    Image.new("RGB", (30, 34), (255, 0, 0)).save(data.val[0][0])
    changed, hit = compute_features(model, data.val, [0, 1], cfg, Hooks(), "")
    assert not hit and not np.array_equal(changed.features[0], first.features[0])
    assert len(list(FeatureCache(cfg.cache_dir).root.glob("*.npy"))) == 4


def test_augmented_probe_caches_unaugmented_features_for_its_batch_norm_statistics(
    colour_data, tmp_path
):
    data = load_dataset(colour_data)
    result = train_probe(tiny_trunk(), data, config(tmp_path, epochs=1, augment=True))
    assert result.report["feature_cache"] == {"train": False, "val": False}
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # train and val


@pytest.mark.parametrize("head", ["attentive", "linear"])
def test_batch_norm_statistics_are_exact_over_the_training_features(colour_data, tmp_path, head):
    """One step per epoch leaves BatchNorm's running averages far from the data's statistics;
    the saved classifier must hold the exact ones, whatever the number of steps."""
    model, data = tiny_trunk(), load_dataset(colour_data)
    cfg = config(tmp_path, head=head, epochs=3, batch_size=60)  # 60 images: one step an epoch
    bn = train_probe(model, data, cfg).model.head.bn
    features, _ = compute_features(model, data.train, [0, 1], cfg, Hooks(), "")
    x = np.asarray(features.features, np.float64)
    x = x.mean(axis=1) if head == "linear" else x.reshape(-1, x.shape[-1])
    assert_parity(bn.running_mean, x.mean(axis=0), rel=1e-5)
    assert_parity(bn.running_var, x.var(axis=0, ddof=1), rel=1e-5)


def test_default_batch_size_scores_like_a_small_batch_on_a_small_real_image_set(tmp_path):
    """200 training crops of five real images: the defaults used to give one step per epoch and
    evaluate with BatchNorm statistics one standard deviation off (78.7 % against 93.3 %)."""
    data = load_dataset(write_texture_dataset(tmp_path / "textures"))
    trunk = random_model("aim-nano", seed=0)

    def top1(**settings):
        cfg = ProbeConfig(cache_dir=str(tmp_path / "cache"), workers=0, **settings)
        return train_probe(trunk, data, cfg).report["final"]["top1"]

    small_batch = top1(batch_size=16)
    assert small_batch >= 0.85
    assert top1() >= small_batch - 0.04


def test_a_probe_needs_two_classes(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "0.png")
    data = load_dataset(tmp_path)
    with pytest.raises(InputError, match="one class folder \\(only\\), a probe needs two or more"):
        check_classes(data)
    with pytest.raises(InputError, match="<class>/<images>"):
        train_probe(tiny_trunk(), data, config(tmp_path))


def test_layer_selection():
    args = V1Args(**TINY | {"num_blocks": 8})
    assert resolve_layers("last", args) == [2, 3, 4, 5, 6, 7]
    assert resolve_layers("1, 3,-1", args) == [1, 3, 7]
    assert resolve_layers("best", V1Args(embed_dim=1536, num_blocks=24, num_heads=12)) == list(
        range(14, 20)
    )
    assert resolve_layers("best", args, "aim-1B") == list(range(12, 18))
    for bad in ("best", "8", "a,b", ""):
        with pytest.raises(ValueError):
            resolve_layers(bad, args)


def test_eval_only_reproduces_the_torch_reference_predictions(tmp_path):
    classes = ["a", "b", "c", "d", "e", "f"]
    rng = np.random.default_rng(3)
    for name in classes:
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (31, 29, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    torch_model = AIMv1Torch(28, 7, 32, 3, 4, num_classes=6, probe_layers=(1, 2))
    init_random_(torch_model, seed=0, std=0.3).eval()
    weights = {k: mx.array(v.numpy()) for k, v in torch_model.state_dict().items()}
    model = build_model(TINY | {"num_blocks": 3, "num_classes": 6, "probe_layers": [1, 2]})
    apply_weights(model, weights)  # sanitize: conv transpose, drop num_batches_tracked
    save_model(model, tmp_path / "clf", preprocessing=aim_v1_preprocessing(28))

    result = CliRunner().invoke(
        app,
        ["probe", "--eval-only", "--model", str(tmp_path / "clf"), "--data",
         str(tmp_path / "data"), "--batch-size", "4", "-o", str(tmp_path / "eval")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [
        json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 18

    prep = Preprocessing(32, 28)
    with torch.no_grad():
        batch = np.stack([prep(Image.open(r["path"]).convert("RGB")) for r in rows])
        logits = torch_model(torch.from_numpy(batch).permute(0, 3, 1, 2)).numpy()
    assert [r["prediction"] for r in rows] == logits.argmax(1).tolist()
    assert [r["label"] for r in rows] == [classes.index(r["path"].split("/")[-2]) for r in rows]
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["top1"] == pytest.approx(np.mean(logits.argmax(1) == [r["label"] for r in rows]))
    assert f"top-1 {100 * report['top1']:.2f}%" in result.stdout


def test_cli_trains_writes_a_classifier_and_reuses_the_cache(colour_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path / "cache"))
    trunk_dir = save_model(tiny_trunk(), tmp_path / "trunk")
    args = ["probe", "--model", str(trunk_dir), "--data", str(colour_data), "--epochs", "2",
            "-b", "16", "-o", str(tmp_path / "out")]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "epoch   2/2" in first.stderr and "val top-1" in first.stdout
    report = json.loads((tmp_path / "out" / "probe_report.json").read_text())
    assert report["feature_cache"] == {"train": False, "val": False}
    second = CliRunner().invoke(app, [*args, "--force"])
    assert second.exit_code == 0, second.output
    report = json.loads((tmp_path / "out" / "probe_report.json").read_text())
    assert report["feature_cache"] == {"train": True, "val": True}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "/no/such/folder"], "not a folder"),
        (["--layers", "best"], "only defined for the released AIMv1 models"),
        (["--layers", "9"], "block 9 does not exist"),
        (["--head", "mlp"], "head must be one of attentive, linear"),
    ],
)
def test_cli_bad_input_is_one_line_with_exit_code_1(colour_data, tmp_path, extra, message):
    trunk_dir = save_model(tiny_trunk(), tmp_path / "trunk")
    args = ["probe", "--model", str(trunk_dir), "--data", str(colour_data), "--epochs", "1",
            "-o", str(tmp_path / "out"), "--no-cache", *extra]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_cli_probes_the_good_images_of_a_messy_folder_and_names_each_bad_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path / "cache"))
    data = write_colour_dataset(tmp_path / "data", train_per_class=6, val_per_class=2)
    corpus = make_corpus(tmp_path / "data" / "train" / "red" / "messy")
    trunk_dir = save_model(tiny_trunk(), tmp_path / "trunk")
    args = ["probe", "--model", str(trunk_dir), "--data", str(data), "--epochs", "1",
            "-b", "8", "-o", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 4, result.output  # partial: written, some images left out
    assert "Traceback" not in result.output
    for bad in corpus["bad"]:
        assert result.stderr.count(str(bad)) == 1, bad
    report = json.loads((tmp_path / "out" / "probe_report.json").read_text())
    assert report["final"]["top1"] >= 0 and len(report["unreadable"]) == len(corpus["bad"])
    assert f"{len(corpus['bad'])} unreadable images left out" in result.stderr


def test_cli_refuses_a_single_class_naming_the_layouts(tmp_path):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (30, 30), (i, 0, 0)).save(tmp_path / "data" / f"loose{i}.png")
        Image.new("RGB", (30, 30), (0, i, 0)).save(tmp_path / "data" / "cats" / f"{i}.png")
    trunk_dir = save_model(tiny_trunk(), tmp_path / "trunk")
    args = [
        "probe",
        "-m",
        str(trunk_dir),
        "-d",
        str(tmp_path / "data"),
        "-o",
        str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "one class folder (cats), a probe needs two or more" in result.stderr
    assert "train/<class>/<images>" in result.stderr and not (tmp_path / "out").exists()


def test_cli_random_init_is_reported_and_has_its_own_default_output(
    colour_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path / "cache"))
    trunk_dir = save_model(tiny_trunk(), tmp_path / "trunk")
    args = ["probe", "--model", str(trunk_dir), "--data", str(colour_data), "--epochs", "1"]
    trained = CliRunner().invoke(app, args)
    random = CliRunner().invoke(app, [*args, "--random-init"])
    assert trained.exit_code == 0 and random.exit_code == 0, random.output
    assert "(random initialisation)" in random.stdout and "initialisation" not in trained.stdout
    for name, expected in (("trunk-probe", False), ("trunk-probe-random", True)):
        report = json.loads((tmp_path / "runs" / name / "probe_report.json").read_text())
        assert report["random_init"] is expected


def test_cli_checks_the_destination_before_any_work(colour_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path / "cache"))
    trunk_dir = save_model(tiny_trunk(), tmp_path / "trunk")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "taken").mkdir()
    for output, message in ((tmp_path / "a-file" / "out", "is not a directory"),
                            (tmp_path / "taken", "already exists (use --force")):  # fmt: skip
        args = ["probe", "-m", str(trunk_dir), "-d", str(colour_data), "-o", str(output)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 3 and message in result.stderr, result.output
        assert "epoch" not in result.stderr and not (tmp_path / "cache").exists()


def test_cli_flags_come_from_probe_config_and_quiet_prints_only_the_summary(
    colour_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path / "cache"))
    trunk_dir = save_model(tiny_trunk(), tmp_path / "trunk")
    args = ["probe", "-m", str(trunk_dir), "-d", str(colour_data), "-e", "2", "-q",
            "--min-lr", "0", "--grad-clip", "0.5", "--workers", "0", "-o", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and len(result.stdout.strip().splitlines()) == 2
    config = json.loads((tmp_path / "out" / "probe_report.json").read_text())["config"]
    assert (config["min_lr"], config["grad_clip"], config["workers"]) == (0.0, 0.5, 0)


def test_cli_eval_only_refuses_to_overwrite_results_without_force(tmp_path, colour_data):
    classifier = save_model(build_model(TINY | {"num_classes": 3}), tmp_path / "clf")
    args = ["probe", "--eval-only", "-m", str(classifier), "-d", str(colour_data), "-q",
            "-o", str(tmp_path / "eval")]  # fmt: skip
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 3 and "already exists (use --force" in again.stderr
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 0
