"""Dataset discovery, splits, the deterministic background loader and the built-in dataset."""

import ast
import gc
import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from image_corpus import make_corpus
from PIL import Image

import mlx_aim.data.builtin as datasets
from mlx_aim.data.builtin import builtin_dataset
from mlx_aim.data.images import find_images
from mlx_aim.data.loader import ImageLoader, find_labeled_images, measure_throughput, split_paths
from mlx_aim.data.transforms import Preprocessing


def make_images(folder, n: int, bad=()) -> list:
    """``n`` 4x4 PNGs whose red value is 10 * their index; indices in ``bad`` are not images."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.png"
        if i in bad:
            path.write_text("not an image")
        else:
            Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(path)
        paths.append(path)
    return paths


def probe(img, rng):
    """(1, 1, 3): the image's identity and one augmentation draw."""
    return np.array([[[img.getpixel((0, 0))[0] / 10, rng.random(), 0.0]]], np.float32)


def jittery_probe(img, rng):
    time.sleep(random.random() * 0.002)  # real randomness: thread timing varies run to run
    return probe(img, rng)


def ids(batch) -> list:
    return [int(round(v)) for v in batch["images"][:, 0, 0, 0]]


def take(loader, n: int) -> list:
    batches = iter(loader)
    out = [next(batches) for _ in range(n)]
    batches.close()
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x["images"], y["images"]) and x["paths"] == y["paths"]
        for x, y in zip(a, b, strict=True)
    )


# ---- splits and labelled folders ---------------------------------------------------------


def test_split_paths_is_deterministic_disjoint_and_ordered():
    items = [f"img{i}.png" for i in range(50)]
    train, val = split_paths(items, 0.2, seed=3)
    assert len(val) == 10 and sorted(train + val) == sorted(items) and not set(train) & set(val)
    assert train == [x for x in items if x in train] and val == [x for x in items if x in val]
    assert split_paths(items, 0.2, seed=3) == (train, val)
    assert split_paths(items, 0.2, seed=4)[1] != val
    assert split_paths(items[:3], 0.01, seed=0)[1] != []  # at least one validation item
    assert split_paths(items, 0.0) == (items, [])
    with pytest.raises(ValueError):
        split_paths(items, 1.0)


def test_find_labeled_images_class_folders(tmp_path):
    make_images(tmp_path / "zebra", 2)
    make_images(tmp_path / "ant" / "nested", 3)
    found = find_labeled_images(tmp_path)
    assert found.classes == ["ant", "zebra"] and found.val is None
    assert [label for _, label in found.train] == [0, 0, 0, 1, 1]


def test_find_labeled_images_train_val_layout(tmp_path):
    for cls in ("cat", "dog", "eel"):
        make_images(tmp_path / "train" / cls, 2)
    make_images(tmp_path / "val" / "eel", 1)
    found = find_labeled_images(tmp_path)
    assert found.classes == ["cat", "dog", "eel"]
    assert [(p.parent.name, label) for p, label in found.val] == [("eel", 2)]
    make_images(tmp_path / "val" / "fox", 1)
    with pytest.raises(ValueError, match="'fox' has no training folder"):
        find_labeled_images(tmp_path)


def test_find_labeled_images_rejects_empty_layouts(tmp_path):
    with pytest.raises(ValueError, match="no class folders"):
        find_labeled_images(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: class folder contains no images"):
        find_labeled_images(tmp_path)


# ---- loader -----------------------------------------------------------------------------


def test_batches_have_images_labels_paths(tmp_path):
    paths = make_images(tmp_path, 10)
    items = [(p, i % 3) for i, p in enumerate(paths)]
    loader = ImageLoader(items, Preprocessing(8, 8), 4, shuffle=False, epochs=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 2  # drop_last
    b = batches[0]
    assert b["images"].shape == (4, 8, 8, 3) and b["images"].dtype == np.float32
    assert b["labels"].dtype == np.int32 and b["labels"].tolist() == [0, 1, 2, 0]
    assert b["paths"] == paths[:4] and b["indices"].tolist() == [0, 1, 2, 3]
    by_arg = next(iter(ImageLoader(paths, probe, 4, labels=[7] * 10, shuffle=False)))
    assert by_arg["labels"].tolist() == [7] * 4


def test_eval_mode_keeps_input_order_and_the_short_last_batch(tmp_path):
    paths = make_images(tmp_path, 10)
    order = paths[::-1]
    loader = ImageLoader(order, probe, 4, shuffle=False, drop_last=False, epochs=1)
    batches = list(loader)
    assert [len(b["paths"]) for b in batches] == [4, 4, 2] and len(loader) == 3
    assert [p for b in batches for p in b["paths"]] == order
    assert same(batches, list(loader))  # every iteration starts again from the start


def test_each_epoch_is_a_new_permutation_of_all_items(tmp_path):
    paths = make_images(tmp_path, 12)
    loader = ImageLoader(paths, probe, 4, seed=5, epochs=3)
    epochs = [sum((ids(b) for b in list(loader)[e * 3 : e * 3 + 3]), []) for e in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = list(ImageLoader(paths, probe, 4, seed=6, epochs=1))
    assert sum((ids(b) for b in other_seed), []) != epochs[0]


def test_output_does_not_depend_on_thread_timing(tmp_path):
    paths = make_images(tmp_path, 16)
    runs = [
        take(ImageLoader(paths, jittery_probe, 3, seed=1, num_workers=w, prefetch=p), 12)
        for w, p in [(0, 1), (1, 2), (3, 4), (3, 1)]
    ]
    assert all(same(runs[0], run) for run in runs[1:])


def test_ranks_split_each_global_batch_of_the_single_process_run(tmp_path):
    paths = make_images(tmp_path, 21)
    single = take(ImageLoader(paths, probe, 6, seed=2), 9)  # 3 steps per epoch, 3 epochs
    ranks = [take(ImageLoader(paths, probe, 3, seed=2, rank=r, world_size=2), 9) for r in (0, 1)]
    for step, batch in enumerate(single):
        joined = np.concatenate([ranks[0][step]["images"], ranks[1][step]["images"]])
        np.testing.assert_array_equal(joined, batch["images"])  # same samples, same augmentation


def test_bad_files_are_skipped_reported_once_and_batches_filled(tmp_path):
    paths = make_images(tmp_path, 8, bad={1, 4})
    errors = []
    loader = ImageLoader(paths, probe, 3, shuffle=False, on_error=errors.append, epochs=3)
    # 8 // 3 = 2 batches per epoch; the entries left over by drop_last replace the bad ones
    assert [ids(b) for b in loader] == [[0, 2, 3], [5, 6, 7]] * 3
    assert [e.path for e in errors] == [paths[1], paths[4]]
    assert "not an image" in errors[0].reason
    good = ImageLoader(make_images(tmp_path / "good", 8), probe, 3, shuffle=False, epochs=1)
    assert [ids(b) for b in good] == [[0, 1, 2], [3, 4, 5]]


def test_non_regular_and_huge_files_are_named_once_and_skipped(tmp_path):
    paths = make_images(tmp_path, 4)
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(40 * 2**30)  # sparse: costs no disk
    items = [
        paths[0],
        tmp_path / "fifo.png",
        paths[1],
        tmp_path / "zero.png",
        tmp_path / "huge.png",
    ]
    errors = []
    loader = ImageLoader([*items, *paths[2:]], probe, 2, shuffle=False, on_error=errors.append)
    batches = take(loader, 3)  # the second epoch reads each bad file again: reported once
    assert [ids(b) for b in batches] == [[0, 1], [2, 3], [0, 1]]
    assert [(e.path.name, e.reason) for e in errors] == [
        ("fifo.png", "not a regular file (a FIFO)"),
        ("zero.png", "not a regular file (a character device)"),
        ("huge.png", "too large: 40960 MiB, above the 1024 MiB limit"),
    ]


def test_corpus_through_find_images_and_loader(tmp_path):
    corpus = make_corpus(tmp_path)
    paths, errors = find_images(tmp_path)
    reported = []
    options = dict(shuffle=False, drop_last=False, epochs=2, on_error=reported.append)
    loader = ImageLoader(paths, Preprocessing(16, 16), 4, **options)
    seen = [p for batch in loader for p in batch["paths"]]
    assert seen == [p for p in paths if p in corpus["good"]] * 2
    bad = [e.path for e in errors] + [e.path for e in reported]
    assert sorted(bad) == sorted(corpus["bad"]) and len(bad) == len(set(bad))
    for e in [*errors, *reported]:
        assert corpus["bad"][e.path].lower() in e.reason.lower()


def test_resuming_continues_the_uninterrupted_sequence(tmp_path):
    paths = make_images(tmp_path, 11, bad={3, 8})
    kwargs = dict(seed=9, num_workers=2, on_error=lambda e: None)
    full = take(ImageLoader(paths, probe, 2, **kwargs), 14)
    first = ImageLoader(paths, probe, 2, **kwargs)
    head = take(first, 6)
    state = json.loads(json.dumps(first.state()))
    assert state["bad"] and set(state) >= {"epoch", "cursor"}
    reported = []
    resumed = ImageLoader(paths, probe, 2, seed=9, start=state, on_error=reported.append)
    assert same(full, head + take(resumed, 8))
    assert all(str(e.path) not in state["bad"] for e in reported)  # still once per path
    with pytest.raises(ValueError, match="cannot resume.*batch_size"):
        ImageLoader(paths, probe, 3, seed=9, start=state)


@pytest.mark.parametrize("drop_last", [True, False])
def test_length_counts_the_batches_left_after_resuming(tmp_path, drop_last):
    paths = make_images(tmp_path, 10)
    loader = ImageLoader(paths, probe, 3, drop_last=drop_last, epochs=2)
    assert len(loader) == len(list(loader)) == (6 if drop_last else 8)
    take(loader, 2)
    resumed = ImageLoader(paths, probe, 3, drop_last=drop_last, epochs=2, start=loader.state())
    assert len(resumed) == len(list(resumed)) == len(loader) - 2


def test_unreadable_datasets_fail_clearly(tmp_path):
    paths = make_images(tmp_path, 5, bad=set(range(5)))
    loader = ImageLoader(paths, probe, 2, on_error=lambda e: None)  # endless by default
    with pytest.raises(ValueError, match="none of the 5 images of epoch 0 could be read"):
        next(iter(loader))
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        ImageLoader(paths, probe, 4, world_size=2)
    with pytest.raises(ValueError, match="no images"):
        ImageLoader([], probe, 1)


def test_threads_stop_on_break_and_on_errors(tmp_path):
    paths = make_images(tmp_path, 8)

    def loader_threads():
        gc.collect()
        return [t for t in threading.enumerate() if t.name.startswith("mlx-aim-loader")]

    for _ in ImageLoader(paths, jittery_probe, 2, num_workers=3):
        break
    assert loader_threads() == []

    def broken(img, rng):
        raise RuntimeError("transform bug")

    with pytest.raises(RuntimeError, match="transform bug"):
        list(ImageLoader(paths, broken, 2, num_workers=3, epochs=1))
    assert loader_threads() == []


def test_mixed_shapes_in_one_batch_are_an_error(tmp_path):
    paths = make_images(tmp_path, 2)
    Image.new("RGB", (5, 3)).save(paths[1])
    with pytest.raises(ValueError, match="different shapes"):
        next(iter(ImageLoader(paths, lambda img, rng: np.asarray(img, np.float32), 2)))


def test_endless_loader_has_no_length(tmp_path):
    loader = ImageLoader(make_images(tmp_path, 4), probe, 2)
    assert loader.batches_per_epoch == 2
    with pytest.raises(TypeError):
        len(loader)


def test_the_data_package_does_not_import_mlx():
    for name in ("images", "transforms", "loader", "builtin", "captions", "scenes"):
        tree = ast.parse((Path(datasets.__file__).parent / f"{name}.py").read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.split(".")[0] == "mlx"], name


def test_measure_throughput(tmp_path):
    loader = ImageLoader(make_images(tmp_path, 8), Preprocessing(8, 8), 4)
    assert measure_throughput(loader, n_batches=3) > 0


# ---- built-in dataset -------------------------------------------------------------------


def test_builtin_digits_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path / "cache"))
    root = builtin_dataset("digits")
    assert root == tmp_path / "cache" / "datasets" / "digits"
    found = find_labeled_images(root)
    assert found.classes == [str(d) for d in range(10)]
    assert (len(found.train), len(found.val)) == (1500, 297)
    counts = np.bincount([label for _, label in found.val])
    assert counts.min() >= 29 and counts.max() <= 30  # stratified
    path, label = found.train[0]
    img = Image.open(path)
    assert (img.mode, img.size) == ("RGB", (32, 32))
    with np.load(datasets._ASSETS / "digits.npz") as data:
        assert data["labels"][int(path.stem)] == label
    stamp = (root / "dataset.json").stat().st_mtime_ns
    assert builtin_dataset("digits") == root  # already there: not rewritten
    assert (root / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="unknown built-in dataset 'mnist'"):
        builtin_dataset("mnist")


def test_interrupted_dataset_write_leaves_nothing(tmp_path, monkeypatch):
    def killed(folder):
        (folder / "train").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "_write_digits", killed)
    with pytest.raises(KeyboardInterrupt):
        builtin_dataset("digits", root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_builtin_datasets_are_addressed_by_name_unless_a_real_path_has_that_name(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert datasets.builtin_name("scenes/count") == "scenes"
    assert datasets.builtin_name("digits") == "digits"
    assert datasets.builtin_name("photos") is None and datasets.builtin_name(None) is None
    assert datasets.is_builtin_name("scenes") and not datasets.is_builtin_name("scenes/count")
    assert datasets.resolve_builtin("digits/val/7") == builtin_dataset("digits") / "val" / "7"
    assert datasets.training_splits("digits") == (
        builtin_dataset("digits") / "train",
        builtin_dataset("digits") / "val",
    )
    (tmp_path / "digits").mkdir()  # a folder of the user's own wins
    assert datasets.builtin_name("digits") is None
    assert datasets.resolve_builtin("digits") == "digits"
