"""``dino cluster`` on Fashion-MNIST test (10 000 images, k = 10): purity and NMI against the
classes for a run's features, the same network untrained (random init), and raw pixels.

Each is clustered as ``dino cluster`` does it (L2-normalized features, faiss k-means, 20
iterations, seed 0); raw pixels are the 784 grey values of each image, L2-normalized.

    PYTHONPATH=src python benchmarks/cluster_fmnist.py --weights /work/runs/builtin
    # -> benchmarks/results/cluster_fashion_mnist.json
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import RESULTS_DIR, cpu_cores, cpu_model

import dino
from dino.eval.clusters import cluster_scores, kmeans, normalized
from dino.eval.folder_features import folder_features, open_images
from dino.eval.views import resolve_view


def run_progress(weights: str) -> dict | None:
    """Epoch and iteration of a run folder's checkpoint (the run may still be training)."""
    path = Path(weights) / "checkpoint.pth"
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    epochs = (state.get("config") or {}).get("optim", {}).get("epochs")
    return {"epoch": state.get("epoch"), "iteration": state.get("iteration"), "of_epochs": epochs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="/work/runs/builtin")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--output", default=str(RESULTS_DIR / "cluster_fashion_mnist.json"))
    args = ap.parse_args()
    source = open_images("fashion-mnist", "test")
    labels = source.data.labels.numpy()
    rows = {}
    progress = run_progress(args.weights)  # of the checkpoint loaded next
    trained = dino.load_backbone(args.weights)
    for name, model in [
        ("run", trained),
        ("random init", dino.load_backbone("random", like=args.weights)),
    ]:
        view = resolve_view("fashion-mnist", model.weights_info.run_config)
        feats, _, _ = folder_features(model, source, view, 256)
        clusters, _, _ = kmeans(normalized(feats), args.k)
        rows[name] = cluster_scores(labels, clusters)
        print(name, rows[name], flush=True)
    pixels = source.data.images.reshape(len(labels), -1).float().numpy()
    clusters, _, _ = kmeans(normalized(pixels), args.k)
    rows["raw pixels"] = cluster_scores(labels, clusters)
    print("raw pixels", rows["raw pixels"])
    result = {
        "what": f"k-means (k={args.k}) of Fashion-MNIST test, purity and NMI against the classes",
        "weights": args.weights,
        "run_progress": progress,
        "arch": trained.weights_info.arch,
        "machine": f"{cpu_model()}, {cpu_cores()} cores, shared with other jobs",
        "load_average": round(os.getloadavg()[0], 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
