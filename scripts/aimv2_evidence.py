"""Does the AIMv2 objective help at laptop scale? The table of docs/aimv2-pretraining.md, reproduced by one command.

    python scripts/aimv2_evidence.py                # 300 steps of batch 32, seed 0 -> runs/evidence
    python scripts/aimv2_evidence.py --seed 1 -o runs/evidence-seed1

On the built-in scenes (``mlx-aim train --objective aimv2`` generates them once), with the same
trunk architecture (``aimv2-nano``), steps, batch, seed and augmentation (no flips, no crops):

1. ``mlx-aim train --objective aimv2``: the multimodal objective on the captioned training scenes;
2. ``mlx-aim train --objective aimv1``: next-patch prediction alone, on the same images;
3. ``mlx-aim probe`` (default settings) of both trunks and of a random ``aimv2-nano`` trunk on the
   ``count/``, ``colour/`` and ``shape/`` folders: trained on their train/ split, top-1 on val/
   (``--seed`` seeds the runs, the probes and the random trunk);
4. the AIMv2 run's captions of the 500 validation scenes: greedy exact match and teacher-forced
   next-token accuracy (``mlx_aim.tasks.caption.score_captions``).

Every stage is resumable: a finished run continues at its last step (nothing to do), a probe
whose ``probe_report.json`` exists is read back. Writes ``table.md`` and ``evidence.json`` to the
output folder and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_aim  # noqa: E402, F401  (first: it picks the fast BLAS before mlx.core loads)

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_aim_cli.scripting import ArgumentParser, positive_int, run_script  # noqa: E402

from mlx_aim.data.builtin import builtin_dataset  # noqa: E402
from mlx_aim.data.captions import find_captioned_images  # noqa: E402
from mlx_aim.errors import MlxAimError  # noqa: E402
from mlx_aim.tasks.caption import Captioner, score_captions  # noqa: E402

MODEL = "aimv2-nano"
TASKS = ("count", "colour", "shape")
AUGMENTATION = ["--hflip", "0", "--min-crop-scale", "1"]


def run_cli(*args: str) -> None:
    """Run an ``mlx-aim`` command of this checkout; stop the script, with its exit code, if it
    fails (the command has printed its own ``error:`` line)."""
    print("$ mlx-aim " + " ".join(args), flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "mlx_aim_cli.main", *args]
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    if code != 0:
        raise MlxAimError(f"mlx-aim {args[0]} stopped with exit code {code} (see above)", code)


def pretrain(objective: str, output: Path, scenes: Path, args: argparse.Namespace) -> float:
    """Train (or continue) one run; return its last logged training speed (images/s)."""
    data = []
    if objective == "aimv1":  # the AIMv2 run's default data: the same captioned scenes
        data = ["--data", str(scenes / "captioned" / "train")]
        data += ["--val-data", str(scenes / "captioned" / "val")]
    run_cli(
        "train", "--objective", objective, "--model", MODEL, *data,
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
        *AUGMENTATION, "--val-every", "100", "--preview-every", "0", "-q", "-o", str(output),
    )  # fmt: skip
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"][-1]["images_per_s"]


def probe(trunk: str, task: str, output: Path, scenes: Path, seed: int) -> float:
    """Top-1 on ``task``'s val/ split of a default attentive probe (trained unless already there);
    ``seed`` seeds the probe (and the random trunk)."""
    report = output / "probe_report.json"
    if not report.is_file():
        random_init = ["--random-init"] if trunk == MODEL else []
        run_cli(
            "probe",
            "--model",
            trunk,
            *random_init,
            "--data",
            str(scenes / task),
            "--seed",
            str(seed),
            "-q",
            "-o",
            str(output),
        )
    return json.loads(report.read_text())["final"]["top1"]


def majority(task: str, scenes: Path) -> float:
    """The share of the largest class in ``task``'s val/ split (a constant guess's accuracy)."""
    counts = [len(list(folder.glob("*.png"))) for folder in (scenes / task / "val").iterdir()]
    return max(counts) / sum(counts)


def caption_scores(run: Path, scenes: Path) -> dict:
    """Exact match and token accuracy of the run's captions of the validation scenes."""
    captioner = Captioner.from_run(run)
    found = find_captioned_images(scenes / "captioned" / "val")
    images = mx.array(np.stack([captioner.preprocess(found.open_image(p)) for p in found.images]))
    scores = score_captions(captioner, images, found.captions)
    examples = captioner.generate(images[:4])
    return {
        "images": scores.images,
        "exact_match": scores.exact_match,
        "token_accuracy": scores.token_accuracy,
        "examples": [
            {"truth": t, "generated": g} for t, g in zip(found.captions[:4], examples, strict=True)
        ],
    }


def table(results: dict) -> str:
    """The markdown table of docs/aimv2-pretraining.md."""
    lines = [
        "| trunk (aimv2-nano) | count | colour | shape | caption exact match | caption token accuracy |",
        "|---|---|---|---|---|---|",
    ]
    names = {"aimv2": "AIMv2 objective", "aimv1": "AIMv1 objective", "random": "random init"}
    for key, name in names.items():
        probes = " | ".join(f"{100 * results['probes'][key][t]:.1f}%" for t in TASKS)
        caption = results["captions"] if key == "aimv2" else None
        text = (
            f"{100 * caption['exact_match']:.1f}% | {100 * caption['token_accuracy']:.1f}%"
            if caption
            else "– | –"
        )
        lines.append(f"| {name} | {probes} | {text} |")
    chance = " | ".join(f"{100 * results['majority'][t]:.1f}%" for t in TASKS)
    lines.append(f"| largest class | {chance} | – | – |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Train, probe and score; write and print the table."""
    parser = ArgumentParser(__doc__, prog="aimv2_evidence.py")
    parser.add_argument("--steps", type=positive_int, default=300, help="steps of each run")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per step")
    parser.add_argument("--seed", type=int, default=0, help="seeds the runs, probes, random trunk")
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/evidence"), help="folder")
    args = parser.parse_args()
    out = args.output.resolve()
    scenes = builtin_dataset("scenes")
    results: dict = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed}
    results["images_per_s"] = {o: pretrain(o, out / o, scenes, args) for o in ("aimv2", "aimv1")}
    trunks = {"aimv2": str(out / "aimv2"), "aimv1": str(out / "aimv1"), "random": MODEL}
    results["probes"] = {
        key: {
            task: probe(trunk, task, out / f"probe-{key}-{task}", scenes, args.seed)
            for task in TASKS
        }
        for key, trunk in trunks.items()
    }
    results["majority"] = {task: majority(task, scenes) for task in TASKS}
    results["captions"] = caption_scores(out / "aimv2", scenes)
    results["load_average"] = os.getloadavg()
    (out / "evidence.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(table(results))
    print(table(results))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    run_script(main)
