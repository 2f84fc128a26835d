"""Which k-means library ``dino cluster`` uses: faiss-cpu against scikit-learn, measured.

200 000 x 384 features (ViT-S/16's width) drawn around ``--true-k`` random unit centres with
noise, L2-normalized as ``dino cluster`` normalizes them; each library clusters them into
``--k`` groups with the same number of Lloyd iterations (MiniBatchKMeans: the same number of
passes over the data), one start each, threads as the machine gives. Reported: wall time and
inertia (sum of squared distances to the nearest centre; lower is better), and each time as a
ratio to faiss's in the same run.

    PYTHONPATH=src python benchmarks/kmeans.py            # -> benchmarks/results/kmeans_200k.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from harness import RESULTS_DIR, cpu_cores, cpu_model


def features(n: int, dim: int, true_k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((true_k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, true_k, n)] + 0.06 * rng.standard_normal((n, dim), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def inertia(x: np.ndarray, centres: np.ndarray) -> float:
    best = np.full(len(x), np.inf, dtype=np.float64)
    for i in range(0, len(x), 8192):
        b = x[i : i + 8192]
        d = (b**2).sum(1)[:, None] - 2 * b @ centres.T + (centres**2).sum(1)[None]
        best[i : i + 8192] = d.min(1)
    return float(np.maximum(best, 0).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--true-k", type=int, default=200)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--output", default=str(RESULTS_DIR / "kmeans_200k.json"))
    ap.add_argument("--timeout", type=int, default=300, help="seconds per library at most")
    ap.add_argument("--library", help=argparse.SUPPRESS)
    args = ap.parse_args()
    x = features(args.n, args.dim, args.true_k)
    load = os.getloadavg()[0]

    def faiss_kmeans() -> np.ndarray:
        import faiss

        km = faiss.Kmeans(args.dim, args.k, niter=args.iters, seed=0, max_points_per_centroid=10**9)
        km.train(x)
        return km.centroids

    def sklearn_kmeans() -> np.ndarray:
        from sklearn.cluster import KMeans

        km = KMeans(args.k, n_init=1, max_iter=args.iters, tol=0, random_state=0).fit(x)
        return km.cluster_centers_

    def sklearn_minibatch() -> np.ndarray:
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(args.k, batch_size=4096, max_iter=args.iters, n_init=1,
                             max_no_improvement=None, tol=0, random_state=0)  # fmt: skip
        return km.fit(x).cluster_centers_

    libraries = {
        "faiss-cpu Kmeans": faiss_kmeans,
        "scikit-learn MiniBatchKMeans": sklearn_minibatch,
        "scikit-learn KMeans": sklearn_kmeans,
    }
    if args.library:  # one library, in this process: time and inertia as JSON
        t = time.perf_counter()
        c = libraries[args.library]()
        dt = time.perf_counter() - t
        print(json.dumps({"library": args.library, "seconds": round(dt, 2),
                          "inertia": round(inertia(x, c), 1)}))  # fmt: skip
        return
    rows: list[dict] = []
    for name in libraries:  # each in a fresh process: faiss's and scikit-learn's OpenMP
        cmd = [sys.executable, __file__, "--library", name, *sys.argv[1:]]  # runtimes apart
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            row = {"library": name, "seconds": None, "note": f"stopped after {args.timeout} s"}
        if rows and rows[0]["seconds"] and row["seconds"]:
            row["time_vs_faiss"] = round(row["seconds"] / rows[0]["seconds"], 2)
        rows.append(row)
        print(row, flush=True)
        save(args, load, rows)  # each library's row as soon as it is measured


def save(args: argparse.Namespace, load: float, rows: list[dict]) -> None:
    result = {
        "what": f"k-means of {args.n} x {args.dim} L2-normalized features into k={args.k}, "
        f"{args.iters} iterations, one start",
        "machine": f"{cpu_model()}, {cpu_cores()} cores, shared with other jobs (timings under "
        "load)",
        "load_average_start": round(load, 2),
        "load_average_end": round(os.getloadavg()[0], 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
