"""LiT at laptop scale: zero-shot accuracy of ``train --objective lit`` on the built-in scenes.

    python scripts/lit_evidence.py --trunk runs/evidence/aimv2 -o runs/lit-evidence
    python scripts/lit_evidence.py --trunk aimv2-nano -o runs/lit-random --seed 1   # random trunk
    python scripts/lit_evidence.py --trunk T -o OUT --train-args '--text-width 128 --text-depth 2'

1. ``mlx-aim train --objective lit --model TRUNK`` (``--steps``, default 300) on the captioned
   training scenes (the validation scenes are never trained on);
2. ``mlx-aim zero-shot --eval`` of the LiT model on folders built from the 500 validation scenes:
   ``shapes8/`` (8 classes ``<colour>_<shape>``: the 8 most frequent colour-shape pairs among
   the scenes whose shapes all share colour and shape), and the ``count/``, ``colour/`` and
   ``shape/`` probe folders' ``val/`` splits.

Writes ``zero_shot.json`` (each set's top-1, top-5 and per-class accuracy) to the output folder
and prints one line per set. Resumable: a finished LiT run continues at its last step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_aim.data.builtin import builtin_dataset  # noqa: E402

CLI = [sys.executable, "-m", "mlx_aim_cli.main"]
TEMPLATE = "a {}"


def shapes8(scenes: Path, out: Path) -> Path:
    """The 8-class colour-shape folder of the validation scenes (hard links)."""
    target = out / "shapes8"
    if target.is_dir():
        return target
    colour = {p.name: p.parent.name for p in (scenes / "colour" / "val").glob("*/*.png")}
    shape = {p.name: p.parent.name for p in (scenes / "shape" / "val").glob("*/*.png")}
    pairs = {name: f"{colour[name]}_{shape[name]}" for name in colour if name in shape}
    keep = [label for label, _ in Counter(pairs.values()).most_common(8)]
    staging = out / ".shapes8.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for name, label in pairs.items():
        if label in keep:
            (staging / label).mkdir(parents=True, exist_ok=True)
            os.link(scenes / "captioned" / "val" / name, staging / label / name)
    staging.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trunk", required=True, help="--model of the LiT run")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the output folder")
    parser.add_argument("--steps", type=int, default=300, help="LiT steps (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="the LiT run's seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="LiT batch (default 64)")
    parser.add_argument(
        "--train-args", default="", help="more flags of the LiT run, e.g. '--text-width 128'"
    )
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    lit = args.output / "lit"
    train = ["train", "--objective", "lit", "--model", args.trunk, "-o", str(lit)]
    train += ["--steps", str(args.steps), "--seed", str(args.seed), "-b", str(args.batch_size)]
    train += args.train_args.split()
    subprocess.run([*CLI, *train, "--quiet"], check=True)
    scenes = builtin_dataset("scenes")
    sets = {"shapes8": shapes8(scenes, args.output)}
    sets.update({task: scenes / task / "val" for task in ("count", "colour", "shape")})
    results = {}
    for name, folder in sets.items():
        command = ["zero-shot", "-m", str(lit), "--eval", str(folder), "--template", TEMPLATE]
        done = subprocess.run([*CLI, *command, "--json"], check=True, capture_output=True)
        results[name] = json.loads(done.stdout)
        chance = 100 / len(results[name]["labels"])
        print(f"{name}: top-1 {100 * results[name]['top1']:.1f}% (chance {chance:.1f}%)")
    (args.output / "zero_shot.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
