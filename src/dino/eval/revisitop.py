"""Revisited Oxford and Paris (revisitop): finding and checking the ground truth, and scoring a
backbone by the Easy, Medium and Hard protocols (mAP and mP@k; see :mod:`dino.eval.ranking`).

The Easy / Medium / Hard protocols take easy / easy+hard / hard images as positives (the rest of
easy/hard as junk)."""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dino.data.datasets import BadImage, load_image
from dino.errors import DinoError
from dino.eval.global_features import GlobalFeatures
from dino.eval.ranking import DEFAULT_KS, QueryTruth, search, write_neighbours

#: The revisitop data sets and their protocols: (positives, extra junk) by difficulty.
REVISITOP_DATASETS = ("roxford5k", "rparis6k")
PROTOCOLS = {
    "easy": (("easy",), ("hard",)),
    "medium": (("easy", "hard"), ()),
    "hard": (("hard",), ("easy",)),
}


@dataclass
class RevisitopSet:
    """A revisitop data set: image and query files, ground truth per query."""

    name: str
    gnd_file: Path
    images: list[Path]
    queries: list[Path]
    gnd: list[dict[str, Any]]


def find_revisitop(data: str | Path, dataset: str | None = None) -> Path:
    """The ground-truth file of ``data``: ``data/gnd_<name>.pkl``, or
    ``data/<dataset>/gnd_<dataset>.pkl`` (the revisitop download layout)."""
    root = Path(data)
    if not root.is_dir():
        raise DinoError(
            f"{root} is not a folder; pass --data with the revisitop folder (holding "
            "roxford5k/ or rparis6k/), or --queries and --database folders"
        )
    if dataset is not None:
        if dataset not in REVISITOP_DATASETS:
            raise DinoError(
                f"unknown --dataset {dataset!r}; choose {' or '.join(REVISITOP_DATASETS)}"
            )
        for candidate in (root / dataset / f"gnd_{dataset}.pkl", root / f"gnd_{dataset}.pkl"):
            if candidate.is_file():
                return candidate
        raise DinoError(
            f"no gnd_{dataset}.pkl in {root} or {root / dataset}; download the revisitop data "
            "(gnd file and jpg/ folder) as its README explains"
        )
    here = sorted(root.glob("gnd_*.pkl"))
    below = sorted(p for name in REVISITOP_DATASETS for p in root.glob(f"{name}/gnd_{name}.pkl"))
    found = here or below
    if len(found) == 1:
        return found[0]
    if not found:
        raise DinoError(
            f"no revisitop ground truth (gnd_roxford5k.pkl, gnd_rparis6k.pkl) in {root}; pass "
            "the revisitop folder, or --queries and --database folders for plain retrieval"
        )
    names = ", ".join(p.stem.removeprefix("gnd_") for p in found)
    raise DinoError(f"{root} holds several data sets ({names}); choose one with --dataset")


def read_revisitop(gnd_file: Path) -> RevisitopSet:
    """Read and check a revisitop ground truth against its ``jpg/`` folder. The file is a
    pickle: only read files you trust."""
    what = f"the ground truth {gnd_file}"
    try:
        with open(gnd_file, "rb") as f:
            cfg = pickle.load(f)
    except Exception as exc:
        raise DinoError(
            f"cannot read {what} ({exc or type(exc).__name__}); download it again"
        ) from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("imlist", "qimlist", "gnd")):
        raise DinoError(f"{what} is not a revisitop file (no imlist, qimlist and gnd)")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise DinoError(
            f"{what} does not match its queries: {len(gnd)} ground-truth entries for "
            f"{len(qimlist)} queries"
        )
    n = len(imlist)
    for q, g in enumerate(gnd):
        if not isinstance(g, dict) or not all(k in g for k in ("easy", "hard", "junk")):
            raise DinoError(f"{what}: entry {q} lacks the easy, hard and junk lists")
        for key in ("easy", "hard", "junk"):
            idx = np.asarray(g[key], dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise DinoError(
                    f"{what} does not match its images: query {qimlist[q]} names image index "
                    f"{int(idx.max() if idx.max() >= n else idx.min())} ({key}), but imlist has "
                    f"{n} images"
                )
    folder = gnd_file.parent / "jpg"
    images = [folder / f"{name}.jpg" for name in imlist]
    queries = [folder / f"{name}.jpg" for name in qimlist]
    missing = [p for p in images + queries if not p.is_file()]
    if missing:
        raise DinoError(
            f"{what} does not match the images: {len(missing)} of its files are missing from "
            f"{folder} (first: {missing[0].name}); download the images or pass the matching "
            "ground truth"
        )
    if not queries:
        raise DinoError(f"{what} lists no query")
    name = gnd_file.stem.removeprefix("gnd_")
    return RevisitopSet(name, gnd_file, images, queries, gnd)


def revisitop_retrieval(
    model: nn.Module,
    data: str | Path,
    dataset: str | None = None,
    imsize: int = 224,
    multiscale: bool = False,
    crop_queries: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    neighbours_csv: str | Path | None = None,
    topk: int = 10,
) -> dict[str, Any]:
    """mAP and mP@k of revisited Oxford or Paris for the Easy, Medium and Hard protocols."""
    ds = read_revisitop(find_revisitop(data, dataset))
    features = GlobalFeatures(model, imsize, multiscale, device, num_workers)
    db = features(ds.images, "database")
    if crop_queries:
        boxes = []
        for q, g in enumerate(ds.gnd):
            if "bbx" not in g:
                raise DinoError(f"{ds.gnd_file} has no query box (bbx) for query {q}")
            boxes.append(g["bbx"])
        q_feats = torch.cat(
            [features.one(_crop(ds.queries[q], boxes[q])) for q in range(len(ds.queries))]
        )
    else:
        q_feats = features(ds.queries, "queries")
    truths = {
        protocol: [QueryTruth(_indices(g, pos), _indices(g, ("junk", *junk))) for g in ds.gnd]
        for protocol, (pos, junk) in PROTOCOLS.items()
    }
    scores, orders, sims = search(q_feats, db, truths, ks, topk, revisitop_pk=True)
    res: dict[str, Any] = {
        "dataset": ds.name,
        "mAP": {p: s["mAP"] for p, s in scores.items()},
        "mP@k": {p: s["precision@k"] for p, s in scores.items()},
    }
    res.update(
        {
            "scores": "fractions in [0, 1]",
            "n_queries": len(ds.queries),
            "n_images": len(ds.images),
            "imsize": imsize,
            "multiscale": multiscale,
            "crop_queries": crop_queries,
            "feature_dim": int(db.shape[1]),
        }
    )
    if neighbours_csv is not None:
        write_neighbours(
            neighbours_csv,
            [p.stem for p in ds.queries],
            [p.stem for p in ds.images],
            orders,
            sims,
            topk,
        )
        res["neighbours"] = str(neighbours_csv)
    return res


def _crop(path: Path, box: Sequence[float]) -> Image.Image:
    try:
        img = load_image(path)
    except BadImage as exc:
        raise DinoError(f"cannot read the image {exc}; replace or remove it") from None
    x1, y1, x2, y2 = (float(v) for v in box)
    return img.crop((math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)))


def _indices(g: dict[str, Any], keys: Sequence[str]) -> np.ndarray:
    parts = [np.asarray(g[k], dtype=np.int64).reshape(-1) for k in keys]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
