"""End-to-end workloads on a folder of JPEG photos (made up here: smooth random content).

``embed``: embed the folder with a released architecture (random weights, written as a transformers
``Aimv2VisionModel`` folder) by ``mlx-aim embed`` and by the transformers pipeline
(``CLIPImageProcessor`` + ``Aimv2VisionModel``, mean of the final tokens), each in its own process
run from start to end (loading included): wall time, peak RSS, and the largest difference between
the two sets of embeddings.

``train``: the loader alone (decoding, RandomResizedCrop to 224 px, flip) and the compiled mlx-aim
training step fed by it, for each number of decoding threads (``--workers``): is decoding ever the
bottleneck?

    python scripts/bench_workloads.py embed                        # AIMv2-L, 64 photos: ~3 min
    python scripts/bench_workloads.py embed --images 16 --depth 4  # a quick check
    python scripts/bench_workloads.py train --workers 0,1,2        # aim-tiny, 128 photos
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mlx_aim  # noqa: F401  (loads the optimized BLAS before MLX, as every mlx-aim command)
from mlx_aim.benchmark.suite import BenchOptions, resolve_config, run_worker
from mlx_aim.checkpoints.registry import get_entry

TRANSFORMERS_PIPELINE = """
import sys, numpy as np, torch
from pathlib import Path
from PIL import Image
from transformers import Aimv2VisionModel, CLIPImageProcessor
model_dir, image_dir, out, batch = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
model = Aimv2VisionModel.from_pretrained(model_dir).eval()
processor = CLIPImageProcessor.from_pretrained(model_dir)
paths = sorted(image_dir.glob("*.jpg"))
vectors = []
with torch.inference_mode():
    for i in range(0, len(paths), batch):
        images = [Image.open(p).convert("RGB") for p in paths[i : i + batch]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        vectors.append(model(pixel_values=pixels).last_hidden_state.mean(1).numpy())
np.save(out, np.concatenate(vectors))
"""


def make_photos(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """``count`` photo-sized JPEGs of smooth random content with some fine grain."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        grain = rng.normal(0, 6, smooth.shape)
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        paths.append(folder / f"photo-{i:05d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def write_random_aimv2(folder: Path, name: str, depth: int | None, seed: int = 0) -> None:
    """The architecture of registry entry ``name`` with random weights as a transformers
    ``Aimv2VisionModel`` folder, with the ``CLIPImageProcessor`` of its preprocessing."""
    import torch
    from transformers import Aimv2VisionConfig, Aimv2VisionModel, CLIPImageProcessor

    entry = get_entry(name)
    c, pre = entry.config, entry.preprocessing
    config = Aimv2VisionConfig(
        hidden_size=c["embed_dim"],
        intermediate_size=c["mlp_hidden_dim"],
        num_hidden_layers=depth or c["num_blocks"],
        num_attention_heads=c["num_heads"],
        image_size=c["image_size"],
        patch_size=c["patch_size"],
        use_head=False,
    )
    torch.manual_seed(seed)
    Aimv2VisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": pre.resize},
        crop_size={"height": pre.crop, "width": pre.crop},
        image_mean=list(pre.mean),
        image_std=list(pre.std),
    ).save_pretrained(folder)


def timed_process(command: list[str], log: Path) -> dict[str, float]:
    """Run ``command`` to its end (stderr to ``log``): wall seconds and the peak RSS (MB) of that
    process."""
    with open(log, "wb") as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed: {log.read_text()[-2000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def run_embed(args: argparse.Namespace, work: Path) -> dict:
    """mlx-aim embed against the transformers pipeline on one folder of photos."""
    photos = work / "photos"
    make_photos(photos, args.images, *args.photo_size)
    model_dir = work / "model"
    write_random_aimv2(model_dir, args.model, args.depth)
    ours, theirs = work / "mlx-aim.npy", work / "transformers.npy"
    mlx_command = [sys.executable, "-m", "mlx_aim_cli.main", "embed", str(photos)]
    mlx_command += ["-m", str(model_dir), "-b", str(args.batch_size), "--pool", "mean"]
    mlx_command += ["-o", str(ours), "--force", "--quiet"]
    runs = {}
    for _ in range(args.rounds):  # interleaved: the two see the same machine
        for name, command in (
            ("mlx-aim", mlx_command),
            (
                "transformers",
                [sys.executable, "-c", TRANSFORMERS_PIPELINE, str(model_dir)]
                + [str(photos), str(theirs), str(args.batch_size)],
            ),
        ):
            result = timed_process(command, work / f"{name}.log")
            best = runs.get(name)
            runs[name] = result if best is None or result["seconds"] < best["seconds"] else best
    a, b = np.load(ours), np.load(theirs)
    order = [Path(p).name for p in ours.with_suffix(".paths.txt").read_text().splitlines()]
    a = a[np.argsort(order)]  # mlx-aim's input order, sorted as the pipeline reads them
    return {
        "model": args.model,
        "depth": args.depth or get_entry(args.model).config["num_blocks"],
        "images": args.images,
        "photo_size": args.photo_size,
        "batch_size": args.batch_size,
        "runs": runs,
        "speedup": runs["transformers"]["seconds"] / runs["mlx-aim"]["seconds"],
        "max_abs_difference": float(np.abs(a - b).max()),
        "max_relative_difference": float(np.abs(a - b).max() / np.abs(b).max()),
    }


def run_train(args: argparse.Namespace, work: Path) -> dict:
    """The loader alone and the mlx-aim step fed by it, for each number of decoding threads."""
    photos = work / "photos"
    make_photos(photos, args.images, *args.photo_size)
    config, _, batch = resolve_config(args.config, ("train",))
    options = BenchOptions(config=args.config, verbose=False)
    rows = []
    for workers in args.workers:
        spec = {
            "impl": "mlx-aim",
            "task": "loader",
            "blas": "auto",
            "config": config,
            "batch": args.batch_size or batch,
            "warmup": 1,
            "steps": args.steps,
            "image_dir": str(photos),
            "num_images": args.images,
            "workers": workers,
            "loader_batches": args.loader_batches,
            "seed": 0,
        }
        raw = run_worker(spec, "mlx", "auto", options, work)
        if "error" in raw:
            raise SystemExit(raw["error"])
        wait, step = sum(raw["fed_wait_s"]), sum(raw["fed_step_s"])
        rows.append(
            {
                "workers": workers,
                "loader_images_per_s": raw["loader_images_per_s"],
                "fed_images_per_s": spec["batch"] * len(raw["fed_step_s"]) / (wait + step),
                "fed_wait_fraction": wait / (wait + step),
            }
        )
    return {
        "config": args.config,
        "images": args.images,
        "photo_size": args.photo_size,
        "rows": rows,
    }


def _markdown(task: str, result: dict) -> str:
    if task == "embed":
        lines = ["| pipeline | wall s | images/s | peak RSS MB |", "|---|---:|---:|---:|"]
        for name, run in result["runs"].items():
            rate = result["images"] / run["seconds"]
            lines.append(
                f"| {name} | {run['seconds']:.1f} | {rate:.2f} | {run['peak_rss_mb']:.0f} |"
            )
        lines.append(
            f"\nmlx-aim is {result['speedup']:.2f}x the transformers pipeline; embeddings differ by "
            f"at most {result['max_abs_difference']:.2g} ({result['max_relative_difference']:.2g} "
            "of the largest)."
        )
        return "\n".join(lines)
    lines = [
        "| decoding threads | loader alone images/s | training fed by it images/s | waiting |",
        "|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['workers']} | {row['loader_images_per_s']:.1f} | "
            f"{row['fed_images_per_s']:.2f} | {100 * row['fed_wait_fraction']:.1f}% |"
        )
    return "\n".join(lines)


def _sizes(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("embed", "train"))
    parser.add_argument("--images", type=int, default=None, help="photos (64 embed, 128 train)")
    parser.add_argument("--photo-size", type=_sizes, default=(640, 480), help="WxH, 640x480")
    parser.add_argument("--batch-size", "-b", type=int, default=8)
    parser.add_argument("--model", default="aimv2-large-patch14-224", help="embed: architecture")
    parser.add_argument("--depth", type=int, default=None, help="embed: blocks (fewer: quicker)")
    parser.add_argument("--rounds", type=int, default=1, help="embed: best of N interleaved runs")
    parser.add_argument("--config", default="aim-tiny", help="train: a benchmark config")
    parser.add_argument("--workers", default="0,1,2", help="train: decoding threads to try")
    parser.add_argument("--steps", type=int, default=8, help="train: timed steps per setting")
    parser.add_argument("--loader-batches", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    args.images = args.images or (64 if args.task == "embed" else 128)
    args.workers = [int(w) for w in args.workers.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    """Run one workload and print its table (and write its JSON)."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlx-aim-workloads-") as work:
        run = run_embed if args.task == "embed" else run_train
        result = run(args, Path(work))
    result["load_average"] = list(os.getloadavg())
    print(_markdown(args.task, result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
