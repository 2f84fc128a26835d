"""Precision and recall of ``dino duplicates`` on a folder with known near-duplicates, and the
threshold the command's default comes from.

The folder: ``--distinct`` Fashion-MNIST test images (distinct files; the data set itself has
look-alikes, which count as false pairs here) and one edited copy of each of the first
``--copies``: a crop (70-90 % of the side, resized back), a rescale (x0.6 to x2), a JPEG
re-encode (quality 20-60) or a colour shift (a tint in RGB), in turn. A true pair is (image,
its copy); a found pair is two images of one group. Precision = true found pairs / found pairs,
recall = true found pairs / true pairs. The features are computed once; the thresholds are swept
on them, and the command's whole work (features, blocked similarity, groups) is timed at the
default threshold.

    PYTHONPATH=src python benchmarks/duplicates.py --weights /work/runs/builtin
    # -> benchmarks/results/duplicates.json (one entry per --weights)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from cluster_fmnist import run_progress
from harness import RESULTS_DIR, cpu_cores, cpu_model
from PIL import Image

import dino
from dino.data.datasets import fashion_mnist
from dino.eval.clusters import normalized
from dino.eval.duplicates import DEFAULT_THRESHOLD, duplicate_groups
from dino.eval.folder_features import folder_features, open_images
from dino.eval.views import resolve_view

EDITS = ("crop", "rescale", "jpeg", "colour")


def edited(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    if kind == "crop":
        side = rng.uniform(0.7, 0.9)
        cw, ch = round(w * side), round(h * side)
        left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        return img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
    if kind == "rescale":
        s = rng.uniform(0.6, 2.0)
        return img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(20, 61)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    tint = rng.uniform(0.75, 1.25, 3)
    pix = np.asarray(img.convert("RGB"), dtype=np.float32) * tint
    return Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8))


def make_folder(root: Path, distinct: int, copies: int, seed: int = 0) -> list[tuple[str, str]]:
    """Write the folder; return the true pairs (original file, copy file)."""
    rng = np.random.default_rng(seed)
    ds = fashion_mnist("test")
    pick = rng.choice(len(ds), distinct, replace=False)
    pairs = []
    for n, i in enumerate(pick):
        img = Image.fromarray(ds.images[i, 0].numpy()).convert("RGB")
        name = root / f"img{n:05d}.png"
        img.save(name)
        if n < copies:
            kind = EDITS[n % len(EDITS)]
            copy = root / f"copy{n:05d}-{kind}.png"
            edited(img, kind, rng).save(copy)
            pairs.append((str(name), str(copy)))
    return pairs


def scores(groups: list[np.ndarray], paths: list[str], truth: set[frozenset[str]]) -> dict:
    found = set()
    for g in groups:
        files = [paths[m] for m in g]
        found |= {frozenset((a, b)) for k, a in enumerate(files) for b in files[k + 1 :]}
    hits = found & truth

    def edit(pair: frozenset[str]) -> str:
        return Path(min(pair, key=lambda f: Path(f).name)).stem.split("-")[-1]  # copy... < img...

    by_edit = {k: sum(edit(p) == k for p in hits) / sum(edit(p) == k for p in truth) for k in EDITS}
    return {
        "precision": len(hits) / len(found) if found else 1.0,
        "recall": len(hits) / len(truth),
        **{f"recall_{k}": v for k, v in by_edit.items()},
        "found_pairs": len(found),
        "groups": len(groups),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="/work/runs/builtin")
    ap.add_argument("--distinct", type=int, default=2000)
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--output", default=str(RESULTS_DIR / "duplicates.json"))
    args = ap.parse_args()
    kwargs = {"arch": "vit_pico", "patch_size": 7} if args.weights == "random" else {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder"
        root.mkdir()
        truth = {frozenset(p) for p in make_folder(root, args.distinct, args.copies)}
        load = os.getloadavg()[0]
        progress = run_progress(args.weights)  # of the checkpoint loaded next
        t0 = time.perf_counter()
        model = dino.load_backbone(args.weights, **kwargs)
        source = open_images(str(root))
        info = model.weights_info
        view = resolve_view(str(root), info.run_config if info else None, 28, 28)
        feats, _, rows = folder_features(model, source, view, 256, 0)
        x = normalized(feats)
        groups = duplicate_groups(x, DEFAULT_THRESHOLD)
        seconds = time.perf_counter() - t0
        paths = [source.paths[i] for i in rows]
        sweep = {}
        for t in np.round(np.arange(0.80, 1.0, 0.01), 2):
            s = scores(duplicate_groups(x, float(t)), paths, truth)
            s["f1"] = 2 * s["precision"] * s["recall"] / max(s["precision"] + s["recall"], 1e-9)
            sweep[f"{t:.2f}"] = {k: round(v, 4) for k, v in s.items()}
            print(t, sweep[f"{t:.2f}"], flush=True)
        at_default = scores(groups, paths, truth)
    best = max(sweep, key=lambda t: sweep[t]["f1"])
    result = {
        "what": f"{args.distinct} distinct Fashion-MNIST test images + {args.copies} edited "
        f"copies ({', '.join(EDITS)} in turn), 28 px eval view",
        "weights": args.weights,
        "run_progress": progress,
        "machine": f"{cpu_model()}, {cpu_cores()} cores, shared with other jobs (timings under "
        "load)",
        "load_average_start": round(load, 2),
        "load_average_end": round(os.getloadavg()[0], 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "default_threshold": DEFAULT_THRESHOLD,
        "at_default": {k: round(v, 4) for k, v in at_default.items()},
        "seconds_features_and_groups": round(seconds, 2),
        "best_f1_threshold": float(best),
        "sweep": sweep,
    }
    out = Path(args.output)
    everything = json.loads(out.read_text()) if out.exists() else {}
    everything[args.weights] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(everything, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "sweep"}, indent=2))


if __name__ == "__main__":
    main()
