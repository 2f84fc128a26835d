"""Image retrieval with frozen global features: revisited Oxford and Paris, and plain folders.

The protocol of the paper (the reference's ``eval_image_retrieval.py``):

* each image is shrunk (never enlarged) so that its longer side is at most ``imsize`` px, aspect
  kept, and normalized; the feature is the backbone's output ([CLS] for a ViT), optionally
  averaged over the scales 1, 1/sqrt(2) and 1/2 (bilinear) before L2 normalization;
* the database is ranked by cosine similarity to each query;
* revisited Oxford and Paris are scored by the revisitop definition of mean average precision:
  AP is the area under the precision-recall curve accumulated as trapezoids, *junk* images are
  removed from the ranking before it is scored, queries without a positive image are left out;
  the Easy / Medium / Hard protocols take easy / easy+hard / hard images as positives (the rest
  of easy/hard as junk). mP@k is revisitop's too: precision at ``min(k, rank of the last
  positive)``.

Plain folders: a folder of queries and a folder of database images give the top-k neighbours of
each query; when both hold class subfolders, an image is relevant to a query of the same class
name, and mAP (same AP definition, no junk) and precision@k (relevant share of the first k) are
reported. An image present in both folders is never its own neighbour. Scores are fractions in
[0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dino.errors import DinoError
from dino.eval.global_features import GlobalFeatures
from dino.eval.image_files import data_or_folders, read_folder
from dino.eval.outputs import Backbone, refuse_existing, resolve_backbone, write_json
from dino.eval.ranking import DEFAULT_KS, QueryTruth, search, write_neighbours
from dino.eval.revisitop import find_revisitop, read_revisitop, revisitop_retrieval

log = logging.getLogger("dino")


def folder_retrieval(
    model: nn.Module,
    queries: str | Path,
    database: str | Path,
    imsize: int = 224,
    multiscale: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    neighbours_csv: str | Path | None = None,
    topk: int = 10,
) -> dict[str, Any]:
    """Top-k neighbours of each query among the database images; mAP and precision@k when both
    folders have class subfolders."""
    qf = read_folder(queries, "--queries")
    dbf = read_folder(database, "--database")
    features = GlobalFeatures(model, imsize, multiscale, device, num_workers)
    db = features(dbf.files, "database")
    q = features(qf.files, "queries")
    index = {p.resolve(): i for i, p in enumerate(dbf.files)}
    itself = [index.get(p.resolve()) for p in qf.files]
    truths: dict[str, list[QueryTruth]] = {}
    if qf.classes is not None and dbf.classes is not None:
        db_classes = np.asarray(dbf.classes)
        # an image is not relevant to itself: it is junk for its own query
        truths["classes"] = [
            QueryTruth(
                np.setdiff1d(np.flatnonzero(db_classes == c), [] if i is None else [i]),
                np.asarray([] if i is None else [i], dtype=np.int64),
            )
            for c, i in zip(qf.classes, itself, strict=True)
        ]
    scores, orders, sims = search(q, db, truths, ks, topk, exclude=itself)
    res: dict[str, Any] = {
        "scores": "fractions in [0, 1]",
        "n_queries": len(qf.files),
        "n_database": len(dbf.files),
        "imsize": imsize,
        "multiscale": multiscale,
        "feature_dim": int(db.shape[1]),
    }
    if "classes" in scores:
        scored = scores["classes"]
        res["mAP"] = scored["mAP"]
        res["precision@k"] = scored["precision@k"]
        res["scored_queries"] = scored["scored_queries"]
        if scored["mAP"] is None:
            log.warning(
                "no query class has images in the database folder, so there is no mAP; "
                "name the class subfolders alike in both folders"
            )
    if neighbours_csv is not None:
        write_neighbours(
            neighbours_csv,
            [str(p.relative_to(qf.root)) for p in qf.files],
            [str(p.relative_to(dbf.root)) for p in dbf.files],
            orders,
            sims,
            topk,
        )
        res["neighbours"] = str(neighbours_csv)
    return res


def image_retrieval(
    backbone: Backbone,
    data: str | Path | None = None,
    dataset: str | None = None,
    queries: str | Path | None = None,
    database: str | Path | None = None,
    imsize: int = 224,
    multiscale: bool = False,
    crop_queries: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    neighbours_csv: str | Path | None = None,
    topk: int = 10,
    json_out: str | Path | None = None,
    device: str = "auto",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Image retrieval with frozen features (see the module docstring).

    Args:
        backbone: a module, weights for :func:`dino.load_backbone`, or a function returning the
            module (called once the inputs are checked).
        data: a revisitop folder (``gnd_<name>.pkl`` + ``jpg/``, or its parent with
            ``roxford5k/`` / ``rparis6k/``); or else:
        queries, database: two folders of images (plain retrieval).
        dataset: ``roxford5k`` or ``rparis6k`` when ``data`` holds both.
        imsize: longer side at most this many px (224 for Oxford, 512 for Paris in the paper).
        multiscale: average the features at scales 1, 1/sqrt(2), 1/2.
        crop_queries: crop revisitop queries to their box (revisitop's own protocol; the
            paper's script uses the whole query image).
        ks: the k of precision@k.
        neighbours_csv: write the ``topk`` neighbours of each query there (must not exist).
        json_out: also write the results there as JSON (must not exist).
        device, num_workers: where the network runs; DataLoader workers (-1: auto).

    Returns the scores (fractions in [0, 1]) and counts.
    """
    from dino.devices import resolve_device

    if imsize < 1:
        raise DinoError(f"--imsize must be a positive number of pixels, got {imsize}")
    if any(k < 1 for k in ks) or topk < 1:
        raise DinoError("--k and --topk must be at least 1")
    plain = data_or_folders(
        data, (queries, database), ("--queries", "--database"), "revisitop", "retrieval"
    )
    refuse_existing(neighbours_csv, "--neighbours")
    refuse_existing(json_out, "--json")
    if plain:
        # read both folders before loading weights: a typo fails fast
        read_folder(queries, "--queries")  # type: ignore[arg-type]
        read_folder(database, "--database")  # type: ignore[arg-type]
    else:
        read_revisitop(find_revisitop(data, dataset))  # type: ignore[arg-type]
    dev = resolve_device(device)
    model = resolve_backbone(backbone, dev)
    if plain:
        res = folder_retrieval(
            model,
            queries,  # type: ignore[arg-type]
            database,  # type: ignore[arg-type]
            imsize,
            multiscale,
            ks,
            dev,
            num_workers,
            neighbours_csv,
            topk,
        )
    else:
        res = revisitop_retrieval(
            model,
            data,  # type: ignore[arg-type]
            dataset,
            imsize,
            multiscale,
            crop_queries,
            ks,
            dev,
            num_workers,
            neighbours_csv,
            topk,
        )
    info = getattr(model, "weights_info", None)
    res["weights"] = info.source if info else None
    if json_out is not None:
        write_json(json_out, res)
    return res
