"""What a run shows and leaves behind: progress display, ``metrics.jsonl``, previews, loss curve.

Pictures are drawn with Pillow only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from .. import io
from ..data.transforms import denormalize

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Reporter:
    """Console display and files of rank 0; other ranks get a silent one (``enabled=False``).

    On a terminal a live progress bar shows step, loss, learning rate, images/s, ETA and peak
    memory; elsewhere (logs, pipes) one line is printed per logging step.
    """

    def __init__(
        self, output: Path, total_steps: int, *, enabled: bool = True, quiet: bool = False
    ):
        self.output = output
        self.total = total_steps
        self.enabled = enabled
        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self._progress: Progress | None = None
        self._task = None
        self._logged = False
        self._log_file = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled:
            return
        self._log_file = open(self.output / LOG_FILE, "a", buffering=1)
        if self.console.is_terminal and not self.quiet:
            self._progress = Progress(
                TextColumn("[bold]train[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task(
                "train", total=self.total, completed=0, status="starting"
            )
            self._progress.start()

    def stop_display(self) -> None:
        """End the live progress bar (before the final summary)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self.stop_display()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # ---- messages -----------------------------------------------------------------------------

    def log(self, message: str, *, always: bool = False) -> None:
        """A one-line message: on the console (unless quiet) and in ``train.log``."""
        if not self.enabled:
            return
        if self._log_file is not None:
            self._log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if always or not self.quiet:
            (self._progress.console if self._progress else self.console).print(
                message, markup=False
            )

    def advance(self, step: int, loss: float | None = None) -> None:
        """Move the progress bar (every step; the full numbers change at logging steps)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)
            if loss is not None and not self._logged:
                self._progress.update(self._task, status=f"loss {loss:.4f}")

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        """Show the metrics of a logging step."""
        if not self.enabled:
            return
        self._logged = True
        speed = metrics["images_per_s"]
        status = (
            f"loss {metrics['loss']:.4f}"
            + _val_status(metrics)
            + f" lr {metrics['lr']:.2e} "
            + (f"{speed:.1f} img/s ETA {format_duration(metrics['eta_s'])}" if speed else "")
            + f" peak {metrics['peak_memory_gb']:.2f} GB"
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=status)
            if self._log_file is not None:
                self._log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {step} {status}\n")
        else:
            self.log(f"step {step}/{self.total} {status}")


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logging step (``split`` is train or val)."""

    def __init__(self, output: Path):
        self.path = output / METRICS_FILE

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (left by a run that died after its checkpoint)."""
        records = [r for r in self.read() if r["step"] <= step]
        io.write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def append(self, record: dict[str, Any]) -> None:
        with io.writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """The records with a step and a loss (a line cut by a crash or edited away is left out)."""
        if not self.path.exists():
            return []
        records = []
        for line in io.read_text(self.path, max_bytes=2**30).splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and _is_number(record.get("step")):
                if _is_number(record.get("loss")):
                    records.append(record)
        return records


def _val_status(metrics: dict[str, Any]) -> str:
    """`` val 0.2231 @50``: the last validation loss and its step (blank before the first)."""
    if metrics.get("val_loss") is None:
        return ""
    step = metrics.get("val_step")
    return f" val {metrics['val_loss']:.4f}" + (f" @{step}" if step is not None else "")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- pictures ---------------------------------------------------------------------------------

_BACKGROUND = (255, 255, 255)
_GREY = (128, 128, 128)
_TEXT = (20, 20, 20)


def chart_font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` (where Pillow can scale it)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def unpatchify(patches: np.ndarray, grid: int, patch_size: int) -> np.ndarray:
    """(K, p*p*C) raster-order patches back to an (H, W, C) image."""
    c = patches.shape[-1] // patch_size**2
    x = patches.reshape(grid, grid, patch_size, patch_size, c).transpose(0, 2, 1, 3, 4)
    return x.reshape(grid * patch_size, grid * patch_size, c)


def patchify_np(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, C) to (K, p*p*C) in raster order, pixels as (row, col, channel)."""
    h, w, c = image.shape
    p = patch_size
    x = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
    return x.reshape((h // p) * (w // p), p * p * c)


def prediction_panels(
    image: np.ndarray,
    predictions: np.ndarray,
    prefix: int,
    patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    eps: float = 1e-6,
    order: np.ndarray | None = None,
    normalized: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prefix, prediction, truth) uint8 images for one normalized (H, W, C) input.

    ``predictions[t]`` predicts the patch at step t + 1 of ``order`` (raster indices; None:
    raster order), and the prefix is the first ``prefix`` patches of that order. Per-patch-
    normalized predictions (``normalized``) are mapped back with the true patch's mean and
    standard deviation (as MAE shows its reconstructions); then all are de-normalized.
    """
    grid = image.shape[0] // patch_size
    truth_patches = patchify_np(image, patch_size)
    hidden = np.arange(len(truth_patches))[prefix:] if order is None else order[prefix:]
    predicted = truth_patches.copy()
    predicted[hidden] = predictions[prefix - 1 : -1]
    if normalized:
        mu = truth_patches[hidden].mean(-1, keepdims=True)
        sigma = np.sqrt(truth_patches[hidden].var(-1, ddof=1, keepdims=True) + eps)
        predicted[hidden] = predicted[hidden] * sigma + mu
    masked = truth_patches.copy()
    grey = (np.asarray(_GREY, np.float32) / 255 - np.asarray(mean)) / np.asarray(std)
    masked[hidden] = np.tile(grey, patch_size**2)
    to_image = lambda p: denormalize(unpatchify(p, grid, patch_size), mean, std)  # noqa: E731
    return to_image(masked), to_image(predicted), to_image(truth_patches)


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    """``text`` with line breaks added between words so that no line is wider than ``width``
    pixels in ``font`` (its own line breaks kept; a single word wider than that stays whole)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return "\n".join(lines)


def preview_image(
    images: np.ndarray,
    predictions: np.ndarray,
    prefix: int,
    patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    originals: Sequence[Image.Image | None],
    title: str,
    cell: int = 128,
    order: np.ndarray | None = None,
    normalized: bool = True,
    captions: Sequence[str] | None = None,
) -> Image.Image:
    """A grid with one row per image: input file, prefix, next-patch predictions, truth
    (``order`` and ``normalized`` as in ``prediction_panels``), and with ``captions`` a text
    column (one caption per row; lines split at newlines)."""
    columns = ("input", f"prefix ({prefix} patches)", "prediction", "truth")
    pad, header = 8, 40
    text_width = 3 * cell if captions is not None else 0
    width = pad + len(columns) * (cell + pad) + text_width
    height = header + len(images) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill=_TEXT, font=chart_font(13))
    for j, name in enumerate(columns):
        draw.text((pad + j * (cell + pad), 22), name, fill=_TEXT, font=chart_font(11))
    for i, (image, pred, original) in enumerate(zip(images, predictions, originals, strict=True)):
        y = header + i * (cell + pad)
        panels = prediction_panels(
            image, pred, prefix, patch_size, mean, std, order=order, normalized=normalized
        )
        if original is not None:
            scale = cell / max(original.size)
            size = (max(1, round(original.width * scale)), max(1, round(original.height * scale)))
            thumb = original.resize(size, Image.Resampling.BICUBIC)
            canvas.paste(thumb, (pad + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        for j, panel in enumerate(panels, 1):
            big = Image.fromarray(panel).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(big, (pad + j * (cell + pad), y))
        if captions is not None:
            x = pad + len(columns) * (cell + pad)
            font = chart_font(11)
            text = wrap_text(draw, captions[i], font, text_width - pad)
            draw.text((x, y + cell // 6), text, fill=_TEXT, font=font, spacing=6)
    if captions is not None:
        draw.text(
            (pad + len(columns) * (cell + pad), 22),
            "caption (generated, greedy)",
            fill=_TEXT,
            font=chart_font(11),
        )
    return canvas


def log_ticks(low: float, high: float) -> list[float]:
    """Round tick values of a log-scale axis showing ``[low, high]`` (both > 0).

    1, 2 and 5 x 10^k (every digit for a narrow range, decades for a wide one), from the largest
    at most ``low`` to the smallest at least ``high``: the first and last are the axis limits.
    """

    def ladder(mantissas: Sequence[int]) -> list[float]:
        exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        values = [float(f"{m}e{e}") for e in exponents for m in mantissas]
        below = max(v for v in values if v <= low)
        above = min(v for v in values if v >= high)
        return [v for v in values if below <= v <= above]

    ticks = ladder((1, 2, 5))
    if len(ticks) < 4:
        return ladder(range(1, 10))
    return ticks if len(ticks) <= 10 else ladder((1,))


def loss_curve_image(
    train: Sequence[tuple[int, float]],
    val: Sequence[tuple[int, float]],
    title: str = "loss",
    size: tuple[int, int] = (720, 420),
    probe: Sequence[tuple[int, float]] = (),
    probe_label: str = "probe top-1",
) -> Image.Image:
    """A line chart of the train (blue) and validation (orange) loss against the step.

    The loss axis is logarithmic with round tick values; values that are not positive and
    finite are left out. ``probe`` (step, top-1 in [0, 1]) is drawn in green against a second
    axis on the right, 0 to 100 %, named ``probe_label``.
    """
    width, height = size
    left, right, top, bottom = 64, (56 if probe else 16), 32, 40
    canvas = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = chart_font(11)
    draw.text((left, 8), title, fill=_TEXT, font=chart_font(13))
    train, val = ([p for p in s if math.isfinite(p[1]) and p[1] > 0] for s in (train, val))
    points = [*train, *val]
    if not points:
        draw.text((left, height // 2), "no finite loss recorded", fill=_TEXT, font=font)
        return canvas
    probe = [p for p in probe if math.isfinite(p[1])]
    x0, x1 = min(p[0] for p in [*points, *probe]), max(p[0] for p in [*points, *probe])
    x1 = max(x1, x0 + 1)
    ticks = log_ticks(min(p[1] for p in points), max(p[1] for p in points))
    if len(ticks) == 1:  # one loss value: an axis around it
        ticks = log_ticks(ticks[0] / 2, ticks[0] * 2)
    y0, y1 = math.log(ticks[0]), math.log(ticks[-1])

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = top + (y1 - math.log(value)) / (y1 - y0) * (height - top - bottom)
        return x, y

    draw.rectangle((left, top, width - right, height - bottom), outline=_GREY)
    for value in ticks:
        _, y = xy(x0, value)
        draw.line((left - 4, y, left, y), fill=_GREY)
        draw.text((4, y - 6), f"{value:g}", fill=_TEXT, font=font)
    for k in range(5):
        step = x0 + (x1 - x0) * k / 4
        x, _ = xy(step, ticks[0])
        draw.line((x, height - bottom, x, height - bottom + 4), fill=_GREY)
        draw.text((x - 12, height - bottom + 6), f"{step:.0f}", fill=_TEXT, font=font)
    draw.text((width // 2 - 12, height - 16), "step", fill=_TEXT, font=font)
    draw.text((4, height - 16), "loss: log scale", fill=_TEXT, font=font)
    if probe:
        _draw_accuracy_axis(draw, (width - right, top, height - bottom), font)
    accuracy_y = lambda v: top + (1 - v) * (height - top - bottom)  # noqa: E731
    # top right, above a falling loss; bottom left with the probe's top-1 (high, along the top)
    legend = (left + 10, height - bottom - 50) if probe else (width - right - 60, top)
    for series, colour, label, dy in (
        (train, (31, 119, 180), "train", 0),
        (val, (255, 127, 14), "val", 14),
        (probe, (44, 160, 44), probe_label, 28),
    ):
        line = [(xy(s, 1.0)[0], accuracy_y(v)) if series is probe else xy(s, v) for s, v in series]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line if len(line) <= 50 or series is not train else []:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        if line:
            lx, ly = legend
            draw.line((lx, ly + 10 + dy, lx + 16, ly + 10 + dy), fill=colour, width=2)
            draw.text((lx + 20, ly + 4 + dy), label, fill=_TEXT, font=font)
    return canvas


def _draw_accuracy_axis(
    draw: ImageDraw.ImageDraw, axis: tuple[float, float, float], font: ImageFont.ImageFont
) -> None:
    """Ticks 0, 25, ..., 100 % on the vertical line ``x`` from ``top`` (100 %) to ``bottom``."""
    x, top, bottom = axis
    for k in range(5):
        y = bottom - k / 4 * (bottom - top)
        draw.line((x, y, x + 4, y), fill=_GREY)
        draw.text((x + 6, y - 6), f"{25 * k}%", fill=_TEXT, font=font)


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (``mlx_aim.io``)."""
    with io.atomic_paths(path) as (tmp,):
        image.save(tmp, format="PNG")
