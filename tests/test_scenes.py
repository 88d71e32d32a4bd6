"""The built-in captioned scenes (mlx_aim/data/scenes.py)."""

import numpy as np
import pytest

from mlx_aim.data import scenes
from mlx_aim.data.builtin import builtin_dataset
from mlx_aim.data.captions import find_captioned_images
from mlx_aim.data.loader import find_labeled_images
from mlx_aim.data.scenes import Shape, describe, random_scene, render


def test_captions_count_groups_and_place_lone_shapes():
    red = Shape("circle", "red", "large", 0.2, 0.5)
    assert describe([red]) == "a large red circle on the left"
    twins = [red, Shape("circle", "red", "large", 0.8, 0.5)]
    blue = Shape("square", "blue", "small", 0.5, 0.2)
    assert describe([*twins, blue]) == "two large red circles and a small blue square at the top"
    triangle = Shape("triangle", "white", "small", 0.5, 0.5)
    assert (
        describe([red, blue, triangle])
        == "a large red circle on the left, a small blue square at the top and a small white "
        "triangle in the middle"
    )


def test_generation_is_deterministic_and_shapes_do_not_overlap():
    first = [random_scene(np.random.default_rng(5)) for _ in range(3)]
    assert first == [random_scene(np.random.default_rng(5)) for _ in range(3)]
    for shapes in (random_scene(np.random.default_rng(i)) for i in range(200)):
        assert 1 <= len(shapes) <= 3
        for i, a in enumerate(shapes):
            for b in shapes[i + 1 :]:
                assert np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius
    shapes = random_scene(np.random.default_rng(0))
    a = np.asarray(render(shapes, np.random.default_rng(1)))
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, np.asarray(render(shapes, np.random.default_rng(1))))


def test_written_set_is_captioned_and_labelled(tmp_path, monkeypatch):
    monkeypatch.setattr(scenes, "SCENES", {"train": 30, "val": 6})
    root = builtin_dataset("scenes", root=tmp_path)
    found = find_captioned_images(root / "captioned" / "train")
    assert len(found.images) == 30 and not found.skipped
    counts = find_labeled_images(root / "count")
    assert counts.classes == ["one", "three", "two"] and len(counts.train) == 30
    assert len(counts.val) == 6
    for path, label in counts.train:
        caption = path.with_suffix(".txt").name
        words = (root / "captioned" / "train" / caption).read_text().split()
        n = sum({"a": 1, "two": 2, "three": 3}.get(w, 0) for w in words)
        assert counts.classes[label] == ("one", "two", "three")[n - 1]
    shapes = find_labeled_images(root / "shape")
    assert set(shapes.classes) <= {"circle", "square", "triangle"}


def test_unknown_dataset_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="digits, scenes"):
        builtin_dataset("faces", root=tmp_path)
