"""The AIMv1 paper's findings at laptop scale: an ablation grid, probed, in one call.

The paper (arXiv 2401.08541) makes two claims: (1) the pre-training loss tracks downstream
quality, and (2) its choices matter (normalized-pixel targets, prefix attention, a deeper MLP
head, raster order). ``run_study`` trains the default recipe and one change at a time (``CELLS``)
for fixed steps and several seeds. Every run probes its trunk with the fixed settings of
``train.tracking.PROBE_SETTINGS`` at step 0 and at every checkpoint (``--probe-every`` =
``--checkpoint-every``), so each checkpoint has a validation loss and a probe top-1. The study
then writes into its output folder:

- ``study.md``: per cell, the mean ± half-range over seeds of the final probe top-1 and validation
  loss, next to the paper's numbers, and the Spearman correlations between validation loss and
  probe top-1 over checkpoints;
- ``study.png``: the final top-1 of every cell and seed, and validation loss against top-1 for
  every trained checkpoint;
- ``study.json``: every checkpoint's numbers.

A finished run (its trunk exported, its final step probed) is not trained again, and an
interrupted one resumes from its checkpoint, so running the study again continues it; the numbers
a stopped run recorded at the step it stopped at are left out (only step 0, every
``eval_every``-th step and the last one count), so the tables equal an uninterrupted study's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .. import io
from ..checkpoints.weights import CONFIG_FILE
from ..errors import InputError
from ..train.config import TrainConfig
from ..train.report import METRICS_FILE, chart_font, save_png
from ..train.tracking import PROBE_SETTINGS

# cell name: (what it changes, the settings it changes)
CELLS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("the paper's recipe", {}),
    "pixels": ("raw-pixel targets", {"target": "pixels"}),
    "causal": ("causal attention, no prefix", {"attention": "causal"}),
    "spiral": ("spiral order", {"patch_order": "spiral"}),
    "checkerboard": ("checkerboard order", {"patch_order": "checkerboard"}),
    "random-order": ("fixed random order", {"patch_order": "random"}),
    "shallow-head": ("one-block MLP head", {"head_blocks": 1}),
}
# The paper's numbers for the same change (AIM-0.6B on IN-1k, linear / attentive probe top-1;
# /work/shared/reference/aim-recipe.md, section A "Ablations").
PAPER: dict[str, str] = {
    "default": "70.0 / 78.2",
    "pixels": "worse (no numbers)",
    "causal": "worse (no numbers)",
    "spiral": "67.7 / 76.3 (raster 69.5 / 77.4, causal)",
    "checkerboard": "68.2 / 76.0 (raster 69.5 / 77.4, causal)",
    "random-order": "65.8 / 75.7 (raster 69.5 / 77.4, causal)",
    "shallow-head": "65.3 / 76.2 (6 blocks instead of 12)",
}
STUDY_FILES = ("study.md", "study.png", "study.json")


@dataclass
class StudyConfig:
    """Settings of a study: the grid, the data and the size of every run."""

    data: str | None = None  # training images (None: the built-in digits)
    probe_data: str = "digits"  # labelled images for the probe ("digits": the built-in set)
    model: str = "aim-nano"
    steps: int = 150
    eval_every: int = 50  # validation, probe and checkpoint interval
    seeds: int = 2
    cells: list[str] = field(default_factory=lambda: list(CELLS))
    batch_size: int = 32
    output: str = "runs/study"
    workers: int = 2

    def validate(self) -> StudyConfig:
        unknown = [c for c in self.cells if c not in CELLS]
        if unknown:
            raise InputError(
                f"--cells: unknown cell {unknown[0]!r}; the cells are {', '.join(CELLS)}"
            )
        if not self.cells:
            raise InputError("--cells names no cell")
        for name in ("steps", "eval_every", "seeds", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        return self


@dataclass
class Checkpoint:
    """The numbers of one checkpoint of one run."""

    cell: str
    seed: int
    step: int
    val_loss: float
    top1: float


def run_dir(config: StudyConfig, cell: str, seed: int) -> Path:
    """Where the run of ``cell`` with ``seed`` lives."""
    return Path(config.output).expanduser() / f"{cell}-seed{seed}"


def train_config(config: StudyConfig, cell: str, seed: int) -> TrainConfig:
    """The ``TrainConfig`` of one run: the default recipe with the cell's change."""
    every = min(config.eval_every, config.steps)
    return TrainConfig(
        data=config.data,
        model=config.model,
        steps=config.steps,
        batch_size=config.batch_size,
        seed=seed,
        output=str(run_dir(config, cell, seed)),
        checkpoint_every=every,
        keep_checkpoints=1,
        val_every=every,
        preview_every=0,
        probe_data=config.probe_data,
        probe_every=every,
        log_every=every,
        workers=config.workers,
        quiet=True,
        **CELLS[cell][1],
    ).validate()


def read_checkpoints(
    folder: Path, cell: str, seed: int, config: StudyConfig | None = None
) -> list[Checkpoint]:
    """The steps of a run's ``metrics.jsonl`` that have both a validation loss and a probe top-1;
    with ``config``, only the steps of its schedule (0, every ``eval_every``, the last), not the
    one an interrupted run stopped at."""
    path = folder / METRICS_FILE
    if not path.is_file():
        return []
    val, top1 = {}, {}
    for line in io.read_text(path, max_bytes=2**30).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("split") == "val":
            val[record["step"]] = record["loss"]
        elif record.get("split") == "probe":
            top1[record["step"]] = record["top1"]
    steps = sorted(val.keys() & top1.keys())
    if config is not None:
        every = min(config.eval_every, config.steps)
        steps = [s for s in steps if s % every == 0 or s == config.steps]
    return [Checkpoint(cell, seed, s, val[s], top1[s]) for s in steps]


def is_finished(folder: Path, config: StudyConfig, cell: str, seed: int) -> bool:
    """Whether the run in ``folder`` reached ``config.steps``: trunk exported, last step probed."""
    points = read_checkpoints(folder, cell, seed, config)
    return (folder / CONFIG_FILE).is_file() and bool(points) and points[-1].step == config.steps


def rank(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``values``; tied values share the mean of their ranks."""
    x = np.asarray(values, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks (nan if undefined)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of one length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator else float("nan")


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the half-range (half of max - min) of ``values``."""
    return float(np.mean(values)), float((max(values) - min(values)) / 2)


def correlations(points: list[Checkpoint]) -> dict[str, tuple[float, int]]:
    """Spearman(validation loss, probe top-1) with its number of checkpoints, over: every trained
    checkpoint of every run; those of the cells trained on the paper's objective (same targets,
    attention and order, so their losses compare); every run's final checkpoint; and within each
    run, every checkpoint from step 0 (the mean over runs)."""
    trained = [p for p in points if p.step > 0]
    same_objective = [p for p in trained if p.cell in ("default", "shallow-head")]
    last = max((p.step for p in points), default=0)
    final = [p for p in points if p.step == last]
    out = {}
    for name, subset in (
        ("all trained checkpoints", trained),
        ("the paper's objective (default, shallow-head)", same_objective),
        ("final checkpoints", final),
    ):
        out[name] = (spearman([p.val_loss for p in subset], [p.top1 for p in subset]), len(subset))
    runs: dict[tuple[str, int], list[Checkpoint]] = {}
    for p in points:
        runs.setdefault((p.cell, p.seed), []).append(p)
    within = [spearman([p.val_loss for p in r], [p.top1 for p in r]) for r in runs.values()]
    within = [rho for rho in within if not math.isnan(rho)]
    name = f"within each run, mean over {len(within)} runs"
    out[name] = (float(np.mean(within)) if within else float("nan"), len(points))
    return out


def markdown(config: StudyConfig, points: list[Checkpoint]) -> str:
    """The study's table and correlations as markdown."""
    lines = [
        f"{config.model}, {config.steps} steps, batch {config.batch_size}, seeds "
        f"0..{config.seeds - 1}; probe: {PROBE_SETTINGS.head}, {PROBE_SETTINGS.epochs} epochs, "
        f"on {config.probe_data}. "
        "Mean ± half-range over seeds.",
        "",
        "| cell | change | probe top-1 (%) | val loss | paper (IN-1k, linear / attentive) |",
        "|---|---|---|---|---|",
    ]
    for cell in config.cells:
        final = [p for p in points if p.cell == cell and p.step == config.steps]
        if not final:
            continue
        top1, top1_spread = mean_and_spread([100 * p.top1 for p in final])
        loss, loss_spread = mean_and_spread([p.val_loss for p in final])
        lines.append(
            f"| {cell} | {CELLS[cell][0]} | {top1:.1f} ± {top1_spread:.1f} | "
            f"{loss:.4f} ± {loss_spread:.4f} | {PAPER[cell]} |"
        )
    lines += ["", "Spearman correlation between validation loss and probe top-1:", ""]
    for name, (rho, n) in correlations(points).items():
        lines.append(f"- {name}: {rho:+.2f} ({n} checkpoints)")
    return "\n".join(lines) + "\n"


def run_study(config: StudyConfig, log: Callable[[str], None] = print) -> list[Checkpoint]:
    """Train (or finish) every run of the grid, then write ``STUDY_FILES`` into the output."""
    from ..train import train

    config.validate()
    points: list[Checkpoint] = []
    for cell in config.cells:
        for seed in range(config.seeds):
            folder = run_dir(config, cell, seed)
            if is_finished(folder, config, cell, seed):
                log(f"{cell} seed {seed}: finished before, kept ({folder})")
            else:
                result = train(train_config(config, cell, seed))
                log(f"{cell} seed {seed}: validation loss {result.val_loss:.4f} ({folder})")
            points += read_checkpoints(folder, cell, seed, config)
    output = Path(config.output).expanduser()
    io.write_text(output / "study.md", markdown(config, points))
    save_png(study_image(config, points), output / "study.png")
    io.write_json(output / "study.json", [vars(p) for p in points])
    return points


# ---- the picture --------------------------------------------------------------------------------

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127)]  # fmt: skip
_TEXT, _GREY = (20, 20, 20), (160, 160, 160)


def _scale(low: float, high: float, start: float, end: float) -> Callable[[float], float]:
    span = (high - low) or 1.0
    return lambda v: start + (v - low) / span * (end - start)


def study_image(config: StudyConfig, points: list[Checkpoint]) -> Image.Image:
    """Left: each cell's final probe top-1 (one dot per seed, a bar at the mean). Right: validation
    loss against probe top-1 for every trained checkpoint, coloured by cell."""
    canvas = Image.new("RGB", (960, 420), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = chart_font(11)
    draw.text(
        (16, 8),
        f"{config.model}: the paper's ablations at laptop scale",
        fill=_TEXT,
        font=chart_font(13),
    )
    trained = [p for p in points if p.step > 0]
    if not trained:
        draw.text((16, 200), "no trained checkpoint", fill=_TEXT, font=font)
        return canvas
    low = min(p.top1 for p in trained) * 100 - 1
    high = max(p.top1 for p in trained) * 100 + 1
    colour = {cell: _COLOURS[i % len(_COLOURS)] for i, cell in enumerate(config.cells)}
    # left panel: final top-1 per cell
    x_of = _scale(low, high, 120, 440)
    draw.text((120, 30), "final probe top-1 (%)", fill=_TEXT, font=font)
    for i, cell in enumerate(config.cells):
        y = 60 + i * (320 / max(1, len(config.cells)))
        final = [100 * p.top1 for p in points if p.cell == cell and p.step == config.steps]
        draw.text((8, y - 6), cell, fill=_TEXT, font=font)
        if final:
            draw.line((x_of(low), y, x_of(float(np.mean(final))), y), fill=colour[cell], width=6)
            for value in final:
                draw.ellipse((x_of(value) - 3, y - 9, x_of(value) + 3, y - 3), fill=_TEXT)
    _axis(draw, (120, 440, 385), low, high, font)
    # right panel: validation loss against top-1
    losses = [p.val_loss for p in trained]
    loss_x = _scale(min(losses), max(losses), 540, 940)
    top1_y = _scale(low, high, 370, 40)
    draw.rectangle((540, 40, 940, 370), outline=_GREY)
    for p in trained:
        x, y = loss_x(p.val_loss), top1_y(100 * p.top1)
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour[p.cell])
    draw.text(
        (540, 26),
        "probe top-1 (%) against validation loss, every trained checkpoint (colours as left)",
        fill=_TEXT,
        font=font,
    )
    draw.text((540, 376), f"{min(losses):.3f}", fill=_TEXT, font=font)
    draw.text((900, 376), f"{max(losses):.3f}", fill=_TEXT, font=font)
    draw.text((700, 396), "validation loss", fill=_TEXT, font=font)
    draw.text((504, 34), f"{high:.0f}", fill=_TEXT, font=font)
    draw.text((504, 362), f"{low:.0f}", fill=_TEXT, font=font)
    return canvas


def _axis(
    draw: ImageDraw.ImageDraw, where: tuple[float, float, float], low: float, high: float, font
) -> None:
    """A horizontal axis from x0 to x1 at height y, labelled at its ends."""
    x0, x1, y = where
    draw.line((x0, y, x1, y), fill=_GREY)
    draw.text((x0, y + 4), f"{low:.0f}", fill=_TEXT, font=font)
    draw.text((x1 - 16, y + 4), f"{high:.0f}", fill=_TEXT, font=font)
