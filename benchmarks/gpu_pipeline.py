"""How many DataLoader workers the folder pipeline needs to feed a ViT-S/16 step on one GPU.

For each ``--workers`` count: ``dino train``'s own ``Trainer`` on a folder of JPEG photos (the
default preset's 2 x 224 + 8 x 96 views, bf16, batch ``--batch-size``, K = 65536), ``--steps``
timed steps after one warm-up: seconds per step, seconds blocked waiting for the next batch, and
images per second. The fewest workers whose wait is under 5 % of the step is the answer.

    PYTHONPATH=src python benchmarks/gpu_pipeline.py --json OUT.json     (needs a CUDA GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import describe_device
from input_pipeline import make_photos

from dino.config_load import load_config


def measure(data: str, workers: int, batch: int, steps: int) -> dict[str, Any]:
    from dino.training.step import train_step
    from dino.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        overrides = {"data": data, "output_dir": out, "device": "cuda", "precision": "bf16",
                     "arch": "vit_small", "patch_size": 16, "out_dim": 65536, "epochs": 100,
                     "batch_size": batch, "num_workers": workers, "eval_every": 0,
                     "tensorboard": False}  # fmt: skip
        t = Trainer(load_config("default", overrides))
        gen = t.batches.epoch(0)
        rows = []
        for s in range(steps + 1):
            t0 = time.perf_counter()
            views, _bad = next(gen)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            train_step(t, views)
            t.iteration += 1
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if s:
                rows.append({"wait": t1 - t0, "step": t2 - t1})
        gen.close()
    wait = statistics.median(r["wait"] for r in rows)
    step = statistics.median(r["step"] for r in rows)
    return {
        "workers": workers,
        "step_s": round(step, 4),
        "wait_s": round(wait, 4),
        "wait_share": round(wait / (wait + step), 4),
        "img_per_s": round(batch / (wait + step), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="2,4,8,12")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_pipeline: no CUDA GPU")
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        make_photos(root, args.batch_size * (args.steps + 2))
        rows = []
        for w in counts:
            rows.append(measure(str(root), w, args.batch_size, args.steps))
            print(rows[-1], flush=True)
    enough = [r["workers"] for r in rows if r["wait_share"] < 0.05]
    result = {
        "device": describe_device(torch.device("cuda")),
        "views": "2x224 + 8x96 (default preset), ViT-S/16 bf16, K=65536",
        "batch_size": args.batch_size,
        "rows": rows,
        "workers_needed": min(enough) if enough else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
