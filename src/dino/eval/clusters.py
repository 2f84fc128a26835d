"""``dino cluster``: k-means on the frozen features of a folder of images.

The [CLS] features are L2-normalized (the cosine geometry DINO's k-NN evaluation uses) and
clustered by faiss's k-means (Lloyd iterations, k-means++-free random start, as fast as it gets
on a CPU: ``benchmarks/kmeans.py`` measured it against scikit-learn's KMeans and
MiniBatchKMeans on 200 000 x 384 features). With labels (class subfolders, or a built-in data
set), the clusters are scored against them:

- purity: the share of images whose cluster's most common label is their own;
- NMI: the mutual information of clusters and labels over the mean of their entropies
  (``2 I(C; Y) / (H(C) + H(Y))``, 1 for the same partition, 0 for independent ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dino.errors import DinoError

#: Lloyd iterations of the k-means (faiss's default is 25; 20 is where the inertia of the
#: benchmark's features stopped moving).
KMEANS_ITERS = 20
#: Images per cluster on its contact sheet: the ones nearest its centre.
SHEET_IMAGES = 32


def faiss_module() -> Any:
    """faiss, or the one-line error that tells how to install it."""
    try:
        import faiss
    except ImportError:
        raise DinoError(
            "dino cluster needs faiss (k-means); install it with pip install 'dino[cluster]' "
            "(or pip install faiss-cpu)"
        ) from None
    return faiss


def check_k(k: int, n: int, what: str) -> None:
    """k-means needs at least as many images as clusters."""
    if k > n:
        raise DinoError(
            f"--k {k} is more clusters than the {n} images of {what}; pass --k {n} or less"
        )


def normalized(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, C-contiguous, as faiss wants them)."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kmeans(
    x: np.ndarray, k: int, iters: int = KMEANS_ITERS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cluster of each row [N], its distance to that centre [N], centres [k, D])``."""
    faiss = faiss_module()
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=10**9)
    km.train(x)
    sq, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64), np.sqrt(np.maximum(sq[:, 0], 0)), km.centroids


def contingency(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Counts ``[clusters, labels]`` of images with each (cluster, label)."""
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    table = np.zeros((c.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (c, y), 1)
    return table


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of images whose cluster's most common label is their own."""
    return float(contingency(labels, clusters).max(1).sum() / len(labels))


def nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Normalized mutual information ``2 I(C; Y) / (H(C) + H(Y))`` (natural logs)."""
    p = contingency(labels, clusters) / len(labels)
    pc, py = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pc, py)[nz])).sum())
    hc = float(-(pc[pc > 0] * np.log(pc[pc > 0])).sum())
    hy = float(-(py[py > 0] * np.log(py[py > 0])).sum())
    return 1.0 if hc + hy == 0 else 2 * mi / (hc + hy)


def cluster_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, Any] | None:
    """Purity and NMI against the labels, or None when the images have none."""
    known = labels >= 0
    if not known.any():
        return None
    return {
        "purity": purity(labels[known], clusters[known]),
        "nmi": nmi(labels[known], clusters[known]),
        "labeled_images": int(known.sum()),
    }


def sheet_members(clusters: np.ndarray, distances: np.ndarray, c: int) -> np.ndarray:
    """The rows of cluster ``c`` nearest its centre (at most :data:`SHEET_IMAGES`)."""
    rows = np.flatnonzero(clusters == c)
    return rows[np.argsort(distances[rows], kind="stable")[:SHEET_IMAGES]]


def sheet_path(output: Path, c: int, k: int) -> Path:
    return output / f"cluster-{c:0{len(str(k - 1))}d}.png"
