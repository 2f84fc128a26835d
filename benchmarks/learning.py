"""Does the built-in preset learn? End-to-end runs of ``dino train`` whose teacher's weighted
k-NN (k = 20, T = 0.07, [CLS] features) is compared with the same network at random
initialization (seed 0), the baseline every accuracy needs.

Two cases, each a few minutes to an hour on a 2-core CPU (too long for the test suite, whose
tests check the same code paths on a few steps):

* ``fashion-mnist``: the preset for 2 epochs (936 steps) on Fashion-MNIST, k-NN of the 10k test
  images against the 60k training images; also the DINO loss's KL term at the end (a collapsed
  run has a KL near 0, docs/recipe.md) and whether the run was ever flagged as collapsing.
* ``shapes``: the preset as a user runs it on a folder, ``dino train --config fashion-mnist
  --data DIR``, on 4 000 generated 28-px images of 10 kinds of shapes
  (``tests/helpers/shapes.py``, 1 000 for k-NN queries); the preset's ``min_steps`` lengthens
  the run from 279 steps to 3 000.

    python benchmarks/learning.py                  # both cases
    python benchmarks/learning.py --case shapes

Results merge into ``benchmarks/results/learning.json`` under the case's name.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import RESULTS_DIR, stamp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.shapes import write_shapes  # noqa: E402

from dino.cli import main as dino  # noqa: E402
from dino.eval.api import knn_eval  # noqa: E402
from dino.models.weights import load_backbone  # noqa: E402

CASES = ("fashion-mnist", "shapes")


def run_case(case: str, work: Path) -> dict[str, Any]:
    """Train, then the k-NN of the trained teacher and of the random network, in percent."""
    run = work / "run"
    args = ["train", "--config", "fashion-mnist", "--output-dir", str(run), "--eval-every", "0"]
    args += ["--tensorboard", "false"]
    if case == "fashion-mnist":
        data = "fashion-mnist"
        args += ["--epochs", "2", "--min-steps", "0"]
    else:
        data = str(write_shapes(work / "shapes", 400, 100, seed=1))
        args += ["--data", data]
    t0 = time.perf_counter()
    if dino(args) != 0:
        raise SystemExit(f"dino {' '.join(args)} failed")
    train_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run / "results.json").read_text())
    trained = results["knn"]["20"]["top1"]
    random = load_backbone("random", like=run, seed=0)
    untrained = knn_eval(random, data, ks=[20], device="cpu")["knn"]["20"]["top1"]
    kl = [r["kl"] for r in rows if "kl" in r]
    return {
        "steps": results["iterations"],
        "train_s": round(train_s, 1),
        "knn_top1_k20_trained": trained,
        "knn_top1_k20_random_init": untrained,
        "gain_points": trained - untrained,
        "kl_last5_mean": sum(kl[-5:]) / max(len(kl[-5:]), 1),
        "flagged_collapse": any("collapse" in r for r in rows),
    }


def save(case: str, result: dict[str, Any]) -> Path:
    """Merge ``result`` into ``results/learning.json`` under ``case`` (other cases stay)."""
    path = RESULTS_DIR / "learning.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[case] = result
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, action="append", help="default: both")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    for case in args.case or CASES:
        with tempfile.TemporaryDirectory() as work:
            result = {**stamp(torch.device("cpu")), **run_case(case, Path(work))}
        print(case, json.dumps(result, indent=1), flush=True)
        if not args.no_save:
            print(f"written to {save(case, result)}")


if __name__ == "__main__":
    main()
