"""The lever table of the photo scenes (docs/segmentation.md): one row per `dino train` run on
``fashion-mnist-photos``, read from the run folders.

Each run was made with the same command but for its lever's flags (``benchmarks/photo_levers.sh``
runs them all); the row holds the flags that differ from the first run's config, the steps made,
the training CPU time, the teacher's k-NN top-1 on the object's class (k = 20, from the run's
``results.json``, or ``None`` for a run stopped early), the teacher's mean per-sample entropy over
its last 50 logged steps (nats; log K is a uniform teacher), and the Jaccard scores of ``dino
segment --score --subset 2000`` (``segment2000.json`` in the run folder).

    python benchmarks/photo_levers.py /work/runs/ph-plain /work/runs/ph-sinkhorn ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from harness import RESULTS_DIR, stamp


def flat(cfg: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, fields in cfg.items() if isinstance(fields, dict)
            for k, v in fields.items()}  # fmt: skip


def load_iteration(run: Path) -> int:
    """The iteration of a run's last checkpoint (a run stopped by hand has no results)."""
    from dino.training.checkpoint import load_checkpoint

    return int(load_checkpoint(run)["iteration"])


def row(run: Path, base: dict[str, Any]) -> dict[str, Any]:
    cfg = flat(yaml.safe_load((run / "config.yaml").read_text()))
    skip = {"run.output_dir"}
    changed = {k: v for k, v in cfg.items() if k not in skip and base.get(k) != v}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "teacher_entropy" in r]
    results = (
        json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
    )
    seg = run / "segment2000.json"
    scores = json.loads(seg.read_text()) if seg.exists() else None
    knn = results.get("knn")
    return {
        "run": run.name,
        "changed": changed,
        "steps": results.get("iterations") or load_iteration(run),
        "train_cpu_seconds": results.get("train_cpu_seconds"),
        "knn_object_top1": knn["20"]["top1"] if knn else None,
        "teacher_entropy_last50": round(
            sum(r["teacher_entropy"] for r in steps[-5:]) / max(1, len(steps[-5:])), 2
        ),
        "log_k": round(math.log(cfg["model.out_dim"]), 2),
        "jaccard_2000": None
        if scores is None
        else {
            **scores["jaccard"],
            "centre_prior_of_best_head_area": scores["centre_prior_of_best_head_area"],
            "centre_prior_of_pca_area": scores.get("centre_prior_of_pca_area"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders; the first is the plain run")
    p.add_argument("--untrained", default=None, help="segment --score JSON of the untrained ViT")
    p.add_argument("--output", default=str(RESULTS_DIR / "photo-levers.json"))
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    base = flat(yaml.safe_load((runs[0] / "config.yaml").read_text()))
    rows = [row(r, base) for r in runs]
    for r in rows:
        j = r["jaccard_2000"] or {}
        print(f"{r['run']:16s} steps {r['steps']:5d}  k-NN {r['knn_object_top1']}  entropy "
              f"{r['teacher_entropy_last50']}  best head {j.get('attention_best_head')}  mean "
              f"{j.get('attention_mean')}  PCA {j.get('pca')}  {r['changed']}")  # fmt: skip
    out = Path(args.output)
    command = " ".join(["python", "benchmarks/photo_levers.py", *(argv or sys.argv[1:])])
    result = {"rows": rows, "stamp": stamp(torch.device("cpu")), "command": command}
    if args.untrained:
        scores = json.loads(Path(args.untrained).read_text())
        result["untrained_jaccard_2000"] = {
            **scores["jaccard"],
            "centre_prior_of_best_head_area": scores["centre_prior_of_best_head_area"],
            "centre_prior_of_pca_area": scores.get("centre_prior_of_pca_area"),
        }
        print(f"untrained: {result['untrained_jaccard_2000']}")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
