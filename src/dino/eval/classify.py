"""Label new images: the weighted k-NN vote of a labeled bank (the paper's k-NN classifier,
:mod:`dino.eval.neighbors`), or the head of a fine-tuned classifier (:mod:`dino.eval.finetune`).

The bank's features are computed once and cached in a file keyed by the weights, the bank's
file list (paths, sizes, modification times) and the eval view; a later call with the same key
reads them back. New images are streamed in batches and their rows written as they come: only
features are held in memory, never images, so a folder of 200 000 images costs its bank's
features and one batch.

Inputs are resized and center-cropped by the eval view as in every eval command. When the
weights record the images they were trained on (a fine-tuned classifier, or a run on the
built-in Fashion-MNIST), a bank or new images of another size or channel count are refused
unless ``any_size`` is set: 28-px gray weights do not describe photos.

>>> from dino.eval.classify import classify_images
>>> classify_images("runs/fmnist", "new/", bank="labeled/", output="pred.csv")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from dino.atomic_files import atomic_write, save_torch
from dino.config import KNN_HEADLINE_K, KNN_TEMPERATURE
from dino.data.datasets import (
    BUILTIN,
    BadImage,
    ImageFiles,
    builtin_split,
    load_image,
    opened_image,
)
from dino.devices import resolve_device
from dino.errors import DinoError
from dino.eval.api import as_backbone, features_of, run_config_of
from dino.eval.features import loader_batches
from dino.eval.neighbors import nearest, votes
from dino.eval.outputs import refuse_existing
from dino.eval.views import Data, EvalView, eval_transform, labels_of, resolve_view, with_transform

log = logging.getLogger("dino")

#: The marker of a fine-tuned classifier file (``kind`` key), written by dino finetune.
CLASSIFIER_KIND = "dino-finetuned-classifier"
#: Bumped when the cached bank's content changes.
CACHE_VERSION = 1
#: The new images drawn on a contact sheet (spread over the folder).
SHEET_ROWS = 8


@dataclass
class Bank:
    """A labeled bank's L2-normalized features with their labels and names."""

    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    names: list[str]
    reused: bool = False
    cache: Path | None = None


@dataclass
class Head:
    """A fine-tuned classifier's linear head and what it was trained on."""

    linear: nn.Linear
    classes: list[str]
    expected: dict[str, Any] | None = field(default=None)


def read_classifier(weights: str | Path) -> dict[str, Any] | None:
    """The contents of a fine-tuned classifier file, or None when ``weights`` is something else."""
    path = Path(weights)
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours: the backbone loader reports what is wrong with it
        return None
    return obj if isinstance(obj, dict) and obj.get("kind") == CLASSIFIER_KIND else None


def classifier_head(obj: dict[str, Any]) -> Head:
    """The :class:`Head` of a classifier file's contents (:func:`read_classifier`)."""
    w, b = obj["model"]["head.weight"], obj["model"]["head.bias"]
    linear = nn.Linear(w.shape[1], w.shape[0])
    linear.load_state_dict({"weight": w, "bias": b})
    return Head(linear.eval(), list(obj["classes"]), obj.get("input"))


def expected_input(model: nn.Module, head: Head | None = None) -> dict[str, Any] | None:
    """``{"size": [h, w], "channels": c}`` of the images the weights were trained on, when known:
    a fine-tuned classifier records it; a run on the built-in Fashion-MNIST is 28x28 gray."""
    if head is not None and head.expected:
        return head.expected
    run_data = (run_config_of(model) or {}).get("data") or {}
    if run_data.get("data") == "fashion-mnist":
        return {"size": [28, 28], "channels": 1}
    return None


def input_of(data: Data) -> dict[str, Any]:
    """``{"size": [h, w], "channels": c}`` of the first image of ``data`` (gray: 1, else 3)."""
    if not isinstance(data, ImageFiles):
        c, h, w = data.images.shape[1:]
        return {"size": [int(h), int(w)], "channels": int(c)}
    path = data.files[0]
    try:
        with opened_image(path) as im:
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
            return {"size": [im.size[1], im.size[0]], "channels": 1 if gray else 3}
    except BadImage as exc:
        raise DinoError(f"{exc}; remove the file or run `dino check-data` on its folder") from None


def check_input(expected: dict[str, Any] | None, data: Data, role: str) -> None:
    """Refuse images of another size or channel count than the weights were trained on."""
    if expected is None:
        return
    got = input_of(data)
    if got == {k: expected[k] for k in ("size", "channels")}:
        return
    h, w = got["size"]
    eh, ew = expected["size"]
    raise DinoError(
        f"{role} holds {h}x{w} images with {got['channels']} channel(s) but the weights were "
        f"trained on {eh}x{ew} with {expected['channels']}; pass matching images, or "
        "--any-size to resize them as the eval commands do"
    )


def open_bank(bank: str) -> Data:
    """A labeled bank: a built-in data set's training split or a folder of class subfolders."""
    if bank in BUILTIN:
        data: Data = builtin_split(bank, "train")
    else:
        root = Path(bank)
        if not root.is_dir():
            raise DinoError(f"--bank {bank} is not a folder; pass a folder of class subfolders")
        data = ImageFiles(root)
    if len(data.classes) < 2:
        raise DinoError(
            f"--bank {bank} holds {len(data.classes)} class(es); a k-NN vote needs at least two: "
            "put each class's images in a subfolder named after it"
        )
    return data


def bank_names(data: Data, bank: str) -> list[str]:
    """The name of each bank image: its path, or ``<data set>/train/<index>``."""
    if isinstance(data, ImageFiles):
        return list(data.files)
    return [f"{bank}/train/{i}" for i in range(len(data))]


def bank_key(model: nn.Module, data: Data, bank: str, view: EvalView) -> str:
    """The cache key of a bank's features: weights, file list with sizes and times, view."""
    info = getattr(model, "weights_info", None)
    h = hashlib.sha256()
    weights: dict[str, Any] = {"source": info.source if info else repr(type(model))}
    if info is not None:
        weights.update(arch=info.arch, patch=info.patch_size, key=info.checkpoint_key)
        if Path(info.source).is_file():
            st = os.stat(info.source)
            weights.update(size=st.st_size, mtime=st.st_mtime_ns)
    h.update(json.dumps([CACHE_VERSION, weights, view.to_dict(), bank], default=str).encode())
    if isinstance(data, ImageFiles):
        for path in data.files:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(data.labels.tobytes())
    return h.hexdigest()[:24]


def bank_features(
    model: nn.Module,
    bank: str,
    view: EvalView,
    cache_dir: str | Path | None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> Bank:
    """The bank's normalized features: read from ``cache_dir`` when the bank, the weights and the
    view are those of the cached file, else computed (and cached when ``cache_dir`` is given)."""
    data = open_bank(bank)
    key = bank_key(model, data, bank, view)
    cache = Path(cache_dir) / f"bank-{key}.pt" if cache_dir is not None else None
    names = bank_names(data, bank)
    if cache is not None and cache.is_file():
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                log.info("bank features reused from %s (bank and weights unchanged)", cache)
                return Bank(
                    saved["features"], saved["labels"], saved["classes"], names, True, cache
                )
        except Exception:  # a torn or foreign cache file is rebuilt
            log.info("bank feature cache %s unreadable; computing the features again", cache)
    feats, _ = features_of(model, data, view, batch_size, num_workers, device, "bank features")
    features = F.normalize(feats.float(), dim=1)
    labels = labels_of(data).long()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_torch(
            {"key": key, "features": features, "labels": labels, "classes": list(data.classes)},
            cache,
        )
        log.info("bank features of %d images cached in %s", len(labels), cache)
    return Bank(features, labels, list(data.classes), names, False, cache)


def new_images(images: str | Path) -> ImageFiles:
    """The images to label: every image file below a folder."""
    root = Path(images)
    if not root.is_dir():
        raise DinoError(f"--images {images} is not a folder; pass a folder of images to label")
    return ImageFiles(root)


def query_batches(
    model: nn.Module,
    data: ImageFiles,
    view: EvalView,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> Iterator[tuple[list[str], torch.Tensor, list[str]]]:
    """``(files, features, unreadable files)`` of consecutive batches of ``data``, in order; an
    unreadable file's row is left out of ``files`` and ``features``."""
    start = 0
    dataset = with_transform(data, eval_transform(view))
    with torch.no_grad():
        for x, _y, bad in loader_batches(dataset, batch_size, num_workers, device):
            files = [data.files[start + j] for j in range(x.shape[0])]
            start += x.shape[0]
            rejected = {p for text in bad if text for p, _ in json.loads(text)}
            keep = [j for j, f in enumerate(files) if f not in rejected]
            feats = model(x).float()
            yield [files[j] for j in keep], feats[keep], sorted(rejected & set(files))


def classify_images(
    weights: nn.Module | str | Path,
    images: str | Path,
    bank: str | None = None,
    output: str | Path | None = None,
    k: int = KNN_HEADLINE_K,
    temperature: float = KNN_TEMPERATURE,
    view: EvalView | None = None,
    cache_dir: str | Path | None = None,
    any_size: bool = False,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Label every image below ``images`` and write one CSV row per image to ``output``.

    Args:
        weights: a module or weights for :func:`dino.load_backbone`, or a fine-tuned classifier
            file of ``dino finetune`` (then ``bank`` must be None: its head labels the images).
        images: a folder of images (searched recursively).
        bank: a folder with one subfolder of labeled images per class, or a built-in data set
            (its training split); the k nearest bank images vote (weights ``exp(sim / T)``).
        output: the CSV (must not exist): ``file,label,score`` then, with a bank,
            ``neighbour1,similarity1, ...`` (the k nearest bank images); with a classifier,
            ``second,second_score``. ``score`` is the predicted class's vote share (bank) or
            probability (classifier).
        k, temperature: the vote's neighbours and temperature (as ``dino knn``).
        view: the eval view (default: :func:`dino.eval.views.resolve_view` of ``bank``).
        cache_dir: where the bank's features are cached (None: not cached).
        any_size: resize images of any size and channel count, even when the weights record
            another input (:func:`check_input`).
        batch_size, num_workers, device: as for :func:`dino.eval.api.knn_eval`.

    Returns a summary: counts per class, the bank, whether its features were reused, the first
    images with their neighbours (``examples``, for a contact sheet), ``accuracy`` when the
    images' subfolders are named after the classes.
    """
    clf = read_classifier(weights) if isinstance(weights, (str, Path)) else None
    if clf is not None and bank is not None:
        raise DinoError(
            f"{weights} is a fine-tuned classifier, which labels images with its own head; drop "
            "--bank, or pass the backbone weights it was fine-tuned from to vote with a bank"
        )
    if clf is None and bank is None:
        raise DinoError(
            "--bank is needed with backbone weights: a folder with one subfolder of labeled "
            "images per class (only a classifier of `dino finetune` labels images without one)"
        )
    refuse_existing(output, "--output")
    dev = resolve_device(device)
    head = classifier_head(clf) if clf is not None else None
    model = as_backbone(weights, dev)
    view = view or resolve_view(bank or str(weights), run_config_of(model))
    queries = new_images(images)
    expected = None if any_size else expected_input(model, head)
    check_input(expected, queries, f"--images {images}")
    if head is not None:
        classes, columns = head.classes, ["second", "second_score"]
        labeled: Bank | None = None
    else:
        assert bank is not None
        bank_data = open_bank(bank)
        check_input(expected, bank_data, f"--bank {bank}")
        if k > len(bank_data):
            raise DinoError(
                f"--k {k} asks for more neighbours than the {len(bank_data)} images of the bank; "
                f"pass --k up to {len(bank_data)}"
            )
        labeled = bank_features(model, bank, view, cache_dir, batch_size, num_workers, dev)
        classes = labeled.classes
        columns = [c for i in range(1, k + 1) for c in (f"neighbour{i}", f"similarity{i}")]
    # a class folder is named after its class (a "/" in the name, as Fashion-MNIST's
    # "T-shirt/top", cannot be in a folder's name: "-" stands for it)
    folder_names = {c.replace("/", "-"): i for i, c in enumerate(classes)}
    truth = {c: folder_names[c] for c in queries.classes if c in folder_names}
    counts = dict.fromkeys(classes, 0)
    examples: list[dict[str, Any]] = []
    shown = set(np.linspace(0, len(queries) - 1, SHEET_ROWS).round().astype(int).tolist())
    summary: dict[str, Any] = {"unreadable": [], "correct": 0, "scored": 0}

    def rows() -> Iterator[list[Any]]:
        bar = tqdm(total=len(queries), desc="classify", unit="img", disable=not sys.stderr.isatty())
        batches = query_batches(model, queries, view, batch_size, num_workers, dev)
        position = 0
        for files, feats, bad in batches:
            summary["unreadable"] += bad
            if labeled is not None:
                sims, idx = nearest(labeled.features.to(dev), F.normalize(feats, dim=1), k)
                v = votes(sims, idx, labeled.labels.to(dev), len(classes), temperature)
                share = v / v.sum(1, keepdim=True)
                score, pred = share.max(1)
                idx_l, sims_l = idx.tolist(), sims.tolist()
            else:
                assert head is not None
                probs = head.linear.to(dev)(feats).softmax(1)
                top = probs.topk(min(2, len(classes)), dim=1)
                score, pred = top.values[:, 0], top.indices[:, 0]
            for j, f in enumerate(files):
                label = classes[int(pred[j])]
                counts[label] += 1
                row: list[Any] = [f, label, f"{float(score[j]):.6f}"]
                if labeled is not None:
                    near = [(labeled.names[i], s) for i, s in zip(idx_l[j], sims_l[j], strict=True)]
                    row += [x for n, s in near for x in (n, f"{s:.6f}")]
                else:
                    second = int(top.indices[j, -1])
                    row += [classes[second], f"{float(top.values[j, -1]):.6f}"]
                    near = []
                if position + j in shown:
                    examples.append({"file": f, "label": label, "neighbours": near})
                cls = Path(f).relative_to(queries.root).parts[0]
                if cls in truth:
                    summary["scored"] += 1
                    summary["correct"] += int(truth[cls] == int(pred[j]))
                yield row
            position += len(files)
            bar.update(len(files) + len(bad))
        bar.close()

    header = ["file", "label", "score", *columns]
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(output, lambda f: write_rows(f, header, rows()))
    else:
        for _ in rows():
            pass
    info = getattr(model, "weights_info", None)
    result: dict[str, Any] = {
        "images": sum(counts.values()),
        "counts": counts,
        "classes": classes,
        "mode": "classifier" if head is not None else "knn",
        "weights": info.source if info else None,
        "output": str(output) if output is not None else None,
        "unreadable": summary["unreadable"],
        "view": view.to_dict(),
        "examples": examples,
    }
    if labeled is not None:
        result.update(
            bank=bank,
            bank_images=len(labeled.labels),
            k=k,
            temperature=temperature,
            bank_cache=str(labeled.cache) if labeled.cache else None,
            bank_reused=labeled.reused,
        )
    if summary["scored"]:
        result["accuracy"] = 100.0 * summary["correct"] / summary["scored"]
        result["scored"] = summary["scored"]
    if summary["unreadable"]:
        log.warning("%d unreadable images left out", len(summary["unreadable"]))
    return result


def write_rows(f: IO[bytes], header: list[str], rows: Iterator[list[Any]]) -> None:
    """CSV rows, streamed to a binary file."""
    text = io.TextIOWrapper(f, encoding="utf-8", newline="", write_through=True)
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    text.flush()
    text.detach()


@functools.lru_cache(maxsize=2)
def builtin_images(name: str, split: str) -> torch.Tensor:
    """The images of a built-in split, read once per process."""
    return builtin_split(name, split).images


def open_picture(name: str) -> Image.Image:
    """A bank or new image by the name in the CSV: a file, or ``<data set>/train/<index>``."""
    parts = name.rsplit("/", 2)
    if len(parts) == 3 and parts[0] in BUILTIN and parts[2].isdigit():
        img = builtin_images(parts[0], parts[1])[int(parts[2])]
        return Image.fromarray(np.asarray(img.permute(1, 2, 0).squeeze(-1)))
    return load_image(name)
