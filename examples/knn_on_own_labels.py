"""Weighted k-NN on your own labels with frozen DINO features.

Give a folder of images and their labels, either as class subfolders (``cats/1.jpg``) or as a
CSV file of ``path,label`` rows (paths relative to the folder). The script extracts the features
of every image once (what ``dino extract`` does), then measures the weighted k-NN accuracy of
the paper (cosine similarity, votes weighted by exp(sim / 0.07)) by 5-fold cross-validation,
and shows the nearest neighbours of a few images.

    python examples/knn_on_own_labels.py --weights dino_vits16 --images ~/photos
    python examples/knn_on_own_labels.py --weights runs/X --images ~/photos --labels labels.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dino
from dino.eval import extract_features
from dino.eval.neighbors import weighted_knn


def read_labels(index_csv: Path, images: Path, labels_csv: Path | None) -> tuple[list, list]:
    """The feature rows that have a label, and their labels (strings)."""
    rows, labels = [], []
    given: dict[str, str] = {}
    if labels_csv is not None:
        with open(labels_csv, newline="") as f:
            for record in csv.reader(f):
                if len(record) >= 2 and record[0] != "path":
                    given[str((images / record[0]).resolve())] = record[1]
    with open(index_csv, newline="") as f:
        for record in csv.DictReader(f):
            label = given.get(str(Path(record["path"]).resolve())) if given else record["class"]
            if label:
                rows.append(int(record["row"]))
                labels.append(label)
    return rows, labels


def cross_validated_knn(
    feats: torch.Tensor, y: torch.Tensor, folds: int = 5, ks: tuple[int, ...] = (10, 20)
) -> dict[str, float]:
    """Mean top-1 over ``folds`` splits: each fold is classified by the others."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    scores: dict[str, list[float]] = {str(k): [] for k in ks}
    for part in order.chunk(folds):
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[part] = False
        res = weighted_knn(feats[keep], y[keep], feats[part], y[part], ks, 0.07, int(y.max()) + 1)
        for k, v in res.items():
            scores[k].append(v["top1"])
    return {k: float(np.mean(v)) for k, v in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="dino_vits16", help="a run folder or model name")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, default=None, help="CSV of path,label rows")
    parser.add_argument("--features", type=Path, default=Path("features"))
    args = parser.parse_args()

    backbone = dino.load_backbone(args.weights)
    extract_features(backbone, str(args.images), args.features)
    feats = torch.from_numpy(np.load(args.features / "features.npy"))
    rows, names = read_labels(args.features / "index.csv", args.images, args.labels)
    if len(set(names)) < 2:
        raise SystemExit("need at least two labels: class subfolders or a --labels CSV")
    classes = sorted(set(names))
    y = torch.tensor([classes.index(n) for n in names])
    feats = feats[rows]
    print(f"{len(y)} labeled images, {len(classes)} classes, features of dim {feats.shape[1]}")
    for k, top1 in cross_validated_knn(feats, y).items():
        print(f"weighted k-NN, k={k}: top-1 {top1:.2f}% (5-fold cross-validation)")

    paths = []
    with open(args.features / "index.csv", newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    normed = F.normalize(feats.float(), dim=1)
    sims = normed[:3] @ normed.T
    for i in range(min(3, len(y))):
        nearest = sims[i].topk(min(4, len(y))).indices[1:].tolist()
        print(f"{paths[rows[i]]} ({names[i]}) is nearest to:")
        for j in nearest:
            print(f"    {paths[rows[j]]} ({names[j]}), cosine {float(sims[i, j]):.3f}")


if __name__ == "__main__":
    main()
