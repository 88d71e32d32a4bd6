"""``scenes``: a built-in set of small captioned images, generated deterministically (Pillow + numpy).

Each 32x32 scene holds one to three non-overlapping shapes (circle, square, triangle) of one of
six colours and two sizes on a dark, softly textured background, drawn at 4x and downsampled
(anti-aliased edges). Its caption names every group of identical shapes, with a count, and
where a lone shape is: "two large red circles and a small blue square on the left". Colours are
jittered a little per shape and the background varies, so per-patch-normalised pixels are
never trivially flat.

``write_scenes(folder)`` (called once by ``datasets.builtin_dataset("scenes")``) writes:

- ``captioned/{train,val}/NNNNN.png`` with sidecar ``NNNNN.txt`` captions
  (``captions.find_captioned_images`` reads them);
- labelled class folders for probing (``data.find_labeled_images``): ``count/{train,val}/<one|
  two|three>/``, and ``colour/`` and ``shape/`` with the scenes whose shapes all share that
  attribute, as hard links to the same PNGs (copies where links are not possible).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SCENE_SIZE = 32
SCENES = {"train": 5000, "val": 500}
SEED = 2024
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 45, 40),
    "green": (40, 175, 70),
    "blue": (45, 90, 225),
    "yellow": (235, 205, 45),
    "purple": (150, 65, 195),
    "white": (235, 235, 235),
}
SIZES = {"small": 0.24, "large": 0.4}  # side / diameter as a fraction of the image
COUNTS = ("one", "two", "three")
_ARTICLES = ("a", "two", "three")
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One shape: its attributes and centre (x, y in [0, 1], y down)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return SIZES[self.size] / 2

    @property
    def place(self) -> str:
        """Where the shape is, in words."""
        if self.x < 0.38:
            return "on the left"
        if self.x > 0.62:
            return "on the right"
        if self.y < 0.38:
            return "at the top"
        return "at the bottom" if self.y > 0.62 else "in the middle"


def describe(shapes: list[Shape]) -> str:
    """The caption: each group of identical shapes with its count, and a lone shape's place."""
    groups: dict[tuple[str, str, str], list[Shape]] = {}
    for s in shapes:
        groups.setdefault((s.size, s.colour, s.shape), []).append(s)
    phrases = []
    for (size, colour, shape), members in groups.items():
        n = len(members)
        words = [_ARTICLES[n - 1], size, colour, shape + ("s" if n > 1 else "")]
        phrases.append(" ".join(words + ([members[0].place] if n == 1 else [])))
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def random_scene(rng: np.random.Generator) -> list[Shape]:
    """One to three non-overlapping shapes; a later shape repeats an earlier one's attributes
    half the time (so captions count groups)."""
    count = int(rng.integers(1, 4))
    while True:
        shapes: list[Shape] = []
        for _ in range(count):
            if shapes and rng.random() < 0.5:
                like = shapes[int(rng.integers(len(shapes)))]
                attributes = (like.shape, like.colour, like.size)
            else:
                attributes = (
                    SHAPES[rng.integers(len(SHAPES))],
                    list(COLOURS)[rng.integers(len(COLOURS))],
                    list(SIZES)[rng.integers(len(SIZES))],
                )
            placed = _place(rng, attributes, shapes)
            if placed is None:
                break
            shapes.append(placed)
        if len(shapes) == count:
            return shapes


def _place(rng: np.random.Generator, attributes: tuple, shapes: list[Shape]) -> Shape | None:
    r = SIZES[attributes[2]] / 2
    for _ in range(50):
        x, y = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
        candidate = Shape(*attributes, float(x), float(y))
        if all(np.hypot(x - s.x, y - s.y) > r + s.radius + 0.03 for s in shapes):
            return candidate
    return None


def render(shapes: list[Shape], rng: np.random.Generator, size: int = SCENE_SIZE) -> Image.Image:
    """Draw the shapes on a textured background at ``_SUPERSAMPLE`` x, then downsample."""
    big = size * _SUPERSAMPLE
    level = rng.uniform(20, 80)
    texture = rng.normal(0, 10, (4, 4, 3)) + rng.normal(0, 4, (1, 1, 3))
    noise = Image.fromarray(np.clip(texture + 128, 0, 255).astype(np.uint8))
    texture = np.asarray(noise.resize((big, big), Image.Resampling.BICUBIC), np.float32) - 128
    image = Image.fromarray(np.clip(level + texture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        colour = np.clip(np.array(COLOURS[s.colour]) + rng.integers(-20, 21, 3), 0, 255)
        cx, cy, r = s.x * big, s.y * big, s.radius * big
        fill = tuple(int(c) for c in colour)
        if s.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def write_scenes(folder: Path) -> dict[str, Any]:
    """Generate the set into ``folder`` (see the module docstring); return its description."""
    rng = np.random.default_rng(SEED)
    index = 0
    for split, n in SCENES.items():
        captioned = folder / "captioned" / split
        captioned.mkdir(parents=True)
        for _ in range(n):
            shapes = random_scene(rng)
            path = captioned / f"{index:05d}.png"
            render(shapes, rng).save(path)
            path.with_suffix(".txt").write_text(describe(shapes) + "\n", encoding="utf-8")
            _link_labels(folder, split, path, shapes)
            index += 1
    return {
        "name": "scenes",
        "image_size": SCENE_SIZE,
        **{split: n for split, n in SCENES.items()},
        "captioned": "captioned/{train,val}: NNNNN.png + NNNNN.txt",
        "probes": {
            "count": list(COUNTS),
            "colour": sorted(COLOURS),
            "shape": sorted(SHAPES),
        },
        "seed": SEED,
        "license": "generated by mlx-aim (no third-party content)",
    }


def _link_labels(folder: Path, split: str, path: Path, shapes: list[Shape]) -> None:
    labels = {"count": COUNTS[len(shapes) - 1]}
    for attribute in ("colour", "shape"):
        values = {getattr(s, attribute) for s in shapes}
        if len(values) == 1:
            labels[attribute] = values.pop()
    for task, label in labels.items():
        target = folder / task / split / label / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
