"""The evaluations behind ``dino extract`` and ``dino knn``, as Python functions.

Each takes a backbone (a module, or anything :func:`dino.load_backbone` accepts) and a data
source (a folder or ``"fashion-mnist"``) and returns plain dicts that the commands print and save.

>>> from dino.eval.api import knn_eval
>>> knn_eval("runs/fmnist", "fashion-mnist")["knn"]["20"]  # doctest: +SKIP
{'top1': 84.1, 'top5': 99.2}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dino.atomic_files import write_csv, write_json
from dino.config import KNN_KS, KNN_TEMPERATURE
from dino.devices import resolve_device
from dino.errors import DinoError
from dino.eval.features import extract
from dino.eval.folder_features import extract_to_files, open_images, progress
from dino.eval.labels import (
    check_label_args,
    labels_array,
    per_class_indices,
    spread_over_seeds,
    take,
)
from dino.eval.neighbors import weighted_knn
from dino.eval.patch_features import vit_patch_size
from dino.eval.views import (
    Data,
    EvalView,
    eval_batches,
    num_classes,
    open_labeled,
    resolve_view,
)
from dino.models.weights import load_backbone
from dino.value_checks import check_value

log = logging.getLogger("dino")


def as_backbone(
    backbone: nn.Module | str | Path, device: torch.device, **load_kwargs: Any
) -> nn.Module:
    """A module as is (moved to ``device``, eval mode), or the weights it names loaded."""
    if isinstance(backbone, nn.Module):
        return backbone.to(device).eval()
    return load_backbone(backbone, device=device, **load_kwargs)


def run_config_of(backbone: nn.Module) -> dict | None:
    """The ``dino train`` config of the run that wrote a loaded backbone's weights, if any."""
    info = getattr(backbone, "weights_info", None)
    return info.run_config if info is not None else None


def features_of(
    backbone: nn.Module,
    data: Data,
    view: EvalView,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] (or pooled) features ``[N, D]`` (float32, CPU) and labels of every image of
    ``data`` through the eval view, in dataset order."""
    device = torch.device(device)
    bar = progress(len(data), desc)
    try:
        batches = eval_batches(data, view, batch_size, num_workers, device)
        return extract(backbone, batches, progress=bar.update)
    finally:
        bar.close()


def knn_eval(
    backbone: nn.Module | str | Path,
    data: str = "fashion-mnist",
    ks: list[int] | tuple[int, ...] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    view: EvalView | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str = "auto",
    subset: int = 0,
    chunk: int = 256,
    labels_per_class: int = 0,
    label_seeds: Sequence[int] = (0,),
) -> dict[str, Any]:
    """Weighted k-NN accuracy of frozen features (docs/recipe.md, "Evaluation protocols"):
    bank = train split, queries = val.

    Args:
        backbone: a module or weights for :func:`dino.load_backbone`.
        data: ``fashion-mnist`` or a folder with ``train/`` and ``val/`` class subfolders.
        ks: the numbers of neighbours to report.
        temperature: T of the votes' weights ``exp(sim / T)``.
        view: the eval view (default: :func:`dino.eval.views.resolve_view`).
        batch_size, num_workers: feature extraction batches and DataLoader workers (-1: auto).
        device: ``auto``, ``cpu``, ``cuda``.
        subset: use only the first N images of each split (0: all).
        chunk: queries per similarity block (memory ``chunk x bank``).
        labels_per_class: with N > 0 the bank is N seeded random labeled training images of
            each class (:mod:`dino.eval.labels`); k values above the bank size become the bank
            size. 0: the whole train split.
        label_seeds: the seeds of the banks; with several, ``knn`` holds the mean over them
            with ``top1_std`` and ``top5_std`` (sample standard deviations), and ``per_seed``
            each bank's result.

    Returns ``{"knn": {"20": {"top1": .., "top5": ..}, ...}, "n_train", "n_val", ...}``
    (accuracies in percent).
    """
    seeds = check_label_args(labels_per_class, label_seeds)
    check_value("k", list(ks), "[1, inf)", length=(1, math.inf))
    check_value("temperature", temperature, "(0, inf)")
    dev = resolve_device(device)
    model = as_backbone(backbone, dev)
    view = view or resolve_view(data, run_config_of(model))
    train, val = open_labeled(data, subset)
    banks: dict[int, np.ndarray] = {}
    if labels_per_class:
        labels = labels_array(train)
        banks = {s: per_class_indices(labels, labels_per_class, s) for s in seeds}
        used = np.unique(np.concatenate(list(banks.values())))
        train = take(train, used)  # the features of the images some bank holds, once
        banks = {s: np.searchsorted(used, idx) for s, idx in banks.items()}
        n_bank = min(len(idx) for idx in banks.values())
        capped = sorted({min(int(k), n_bank) for k in ks})
        if capped != sorted({int(k) for k in ks}):
            log.info("k-NN with %d-image banks: k values %s", n_bank, capped)
        ks = capped
    kept = [int(k) for k in ks if int(k) <= len(train)]
    where = f"the {len(train)} training images of {data}{f' (subset {subset})' if subset else ''}"
    if not kept:
        raise DinoError(
            f"k={', '.join(map(str, ks))} asks for more neighbours than {where}; pass --k "
            f"values up to {len(train)}"
        )
    if len(kept) < len(ks):  # left out, never answered by a smaller k under their name
        log.warning(
            "k-NN: k=%s exceed %s and are left out; reported: k=%s",
            ", ".join(str(k) for k in ks if int(k) > len(train)),
            where,
            ", ".join(map(str, kept)),
        )
        ks = kept
    fb, yb = features_of(model, train, view, batch_size, num_workers, dev, "k-NN bank")
    fq, yq = features_of(model, val, view, batch_size, num_workers, dev, "k-NN queries")
    classes = num_classes(train, val)

    def knn_of(rows: np.ndarray | slice) -> dict[str, dict[str, float]]:
        f, y = fb[rows].to(dev), yb[rows].to(dev)
        return weighted_knn(
            f, y, fq.to(dev), yq.to(dev), list(ks), temperature, classes, chunk=chunk
        )

    extra: dict[str, Any] = {}
    if banks:
        per_seed = [{"seed": s, "knn": knn_of(torch.from_numpy(idx))} for s, idx in banks.items()]
        knn = spread_over_seeds([r["knn"] for r in per_seed])
        extra = {"labels_per_class": labels_per_class, "label_seeds": seeds, "per_seed": per_seed}
    else:
        knn = knn_of(slice(None))
    info = getattr(model, "weights_info", None)
    return {
        "knn": knn,
        **extra,
        "temperature": temperature,
        "n_train": min(len(idx) for idx in banks.values()) if banks else len(train),
        "n_val": len(val),
        "feature_dim": int(fb.shape[1]),
        "data": data,
        "weights": info.source if info else None,
        "view": view.to_dict(),
    }


def extract_features(
    backbone: nn.Module | str | Path,
    data: str,
    output_dir: str | Path,
    view: EvalView | None = None,
    split: str = "train",
    batch_size: int = 128,
    num_workers: int = 0,
    device: str = "auto",
    patch_tokens: bool = False,
) -> dict[str, Any]:
    """Features of every image of a folder (or a split of the built-in data) to files.

    Writes into ``output_dir``: ``features.npy`` (float32 ``[N, D]``), with ``patch_tokens``
    also ``patch_tokens.npy`` (float16 ``[N, h, w, D]``: the last block's patch tokens after the
    final norm, on the ``h x w`` patch grid of the eval crop; ViTs only), ``index.csv`` (row,
    path, label, class of each feature row; label -1 without class folders) and ``meta.json``
    (weights, view, counts, unreadable files, which are left out). Both ``.npy`` files are
    written batch by batch through memory maps, and can be read the same way
    (``np.load(path, mmap_mode="r")``).

    Args:
        backbone: a module or weights for :func:`dino.load_backbone`.
        data: a folder of images (class subfolders give labels) or ``fashion-mnist``.
        output_dir: created if needed.
        view: the eval view (default: :func:`dino.eval.views.resolve_view`).
        split: ``train`` or ``test``, for the built-in data set only.
        batch_size, num_workers, device: as for :func:`knn_eval`.
        patch_tokens: also write the patch tokens.

    Returns the contents of ``meta.json`` plus the paths written.
    """
    dev = resolve_device(device)
    model = as_backbone(backbone, dev)
    if patch_tokens:
        vit_patch_size(model, "--patch-tokens")
    view = view or resolve_view(data, run_config_of(model))
    source = open_images(data, split)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels, keep, shapes = extract_to_files(
        model, source, view, out, batch_size, num_workers, dev, patch_tokens
    )
    classes = source.classes
    bad = [p for p, k in zip(source.paths, keep, strict=True) if not k]
    rows = []
    for p, y in zip(source.paths, labels, strict=True):
        rows.append([p, int(y), classes[int(y)] if 0 <= int(y) < len(classes) else ""])
    kept = [[i, *r] for i, r in enumerate(r for r, k in zip(rows, keep, strict=True) if k)]
    write_csv(out / "index.csv", ["row", "path", "label", "class"], kept)
    info = getattr(model, "weights_info", None)
    n, dim = shapes["features.npy"]
    meta: dict[str, Any] = {
        "weights": info.source if info else None,
        "arch": info.arch if info else None,
        "data": data,
        "count": int(n),
        "feature_dim": int(dim),
        "classes": classes,
        "view": view.to_dict(),
        "unreadable": bad,
    }
    if patch_tokens:
        meta["patch_tokens"] = {"shape": list(shapes["patch_tokens.npy"]), "dtype": "float16"}
    write_json(out / "meta.json", meta)
    if bad:
        log.warning("%d unreadable images left out (listed in %s)", len(bad), out / "meta.json")
    meta["files"] = {
        "features": str(out / "features.npy"),
        "index": str(out / "index.csv"),
        "meta": str(out / "meta.json"),
    }
    if patch_tokens:
        meta["files"]["patch_tokens"] = str(out / "patch_tokens.npy")
    return meta
