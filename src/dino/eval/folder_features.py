"""Features of every image of a folder (or of a split of a built-in data set), batch by batch.

:func:`feature_batches` yields the [CLS] features (and, when asked, the patch tokens) of each
batch with the rows to keep: an unreadable file is replaced by the next readable one in the
loader, and its row is dropped. :func:`extract_to_files` streams them into ``.npy`` files
(:func:`numpy.lib.format.open_memmap`), so that the patch tokens of 200 000 images never sit in
memory at once; :func:`folder_features` keeps the [CLS] features in memory, for the commands that
compare all images with each other (``dino cluster``, ``dino duplicates``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from PIL import Image
from torch import nn
from tqdm import tqdm

from dino.atomic_files import reserve
from dino.data.datasets import (
    BUILTIN,
    ImageFiles,
    TensorImages,
    builtin_split,
    decode_bad,
    load_image,
)
from dino.errors import DinoError
from dino.eval.features import loader_batches
from dino.eval.patch_features import crop_to_patches, vit_patch_size
from dino.eval.views import Data, EvalView, eval_batches, eval_transform, with_transform


@dataclass
class ImageSource:
    """The images of ``--data``: the dataset, a name for each image, and the class names."""

    data: Data
    paths: list[str]
    classes: list[str]

    def picture(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB picture, for the contact sheets."""
        if isinstance(self.data, TensorImages):
            x = self.data.images[i]
            return Image.fromarray(x.expand(3, -1, -1).permute(1, 2, 0).numpy())
        return load_image(self.paths[i])


def open_images(data: str, split: str = "train") -> ImageSource:
    """A folder of images (class subfolders give labels) or a split of a built-in data set."""
    if data in BUILTIN:
        if split not in ("train", "test"):
            raise DinoError(f"--split must be train or test for {data}, got {split!r}")
        ds: Data = builtin_split(data, split)
        return ImageSource(ds, [f"{data}/{split}/{i}" for i in range(len(ds))], list(ds.classes))
    files = ImageFiles(data)
    return ImageSource(files, list(files.files), list(files.classes))


@dataclass
class FeatureBatch:
    """One batch: ``start`` (its first image), [CLS] features ``[B, D]``, patch tokens
    ``[B, h, w, D]`` or None, labels ``[B]``, and which rows are readable images ``[B]``."""

    start: int
    cls: np.ndarray
    patches: np.ndarray | None
    labels: np.ndarray
    keep: np.ndarray


@torch.no_grad()
def feature_batches(
    model: nn.Module,
    source: ImageSource,
    view: EvalView,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
    patch_tokens: bool = False,
) -> Iterator[FeatureBatch]:
    """The features of every image of ``source`` through the eval view, in order."""
    patch = vit_patch_size(model, "--patch-tokens") if patch_tokens else 0
    ds = source.data
    if isinstance(ds, TensorImages):
        batches = (
            (x, y, [""] * x.shape[0]) for x, y in eval_batches(ds, view, batch_size, 0, device)
        )
    else:
        dataset = with_transform(ds, eval_transform(view))
        batches = loader_batches(dataset, batch_size, num_workers, device)
    start = 0
    for x, y, bad_reports in batches:
        patches = None
        if patch_tokens:
            x = crop_to_patches(x, patch)
            tokens = model.forward_features(x)
            cls = model.forward_head(tokens)
            grid = tokens[:, int(getattr(model, "num_prefix_tokens", 1)) :]
            h, w = x.shape[-2] // patch, x.shape[-1] // patch
            patches = grid.reshape(x.shape[0], h, w, -1).float().cpu().numpy()
        else:
            cls = model(x)
        keep = np.ones(x.shape[0], dtype=bool)
        for j, report in enumerate(bad_reports):
            # an unreadable image was replaced by the next readable one: drop its row
            if report and source.paths[start + j] in {p for p, _ in decode_bad([report])}:
                keep[j] = False
        yield FeatureBatch(
            start, cls.float().cpu().numpy(), patches, torch.as_tensor(y).numpy(), keep
        )
        start += x.shape[0]


def progress(total: int, desc: str = "features") -> tqdm:
    """A progress bar over ``total`` images (shown on a terminal only)."""
    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not sys.stderr.isatty())


def folder_features(
    model: nn.Module,
    source: ImageSource,
    view: EvalView,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features [N, D] float32, labels [N], rows [N])`` of the readable images of ``source``
    (``rows``: their indices in ``source``)."""
    feats, labels, keep = [], [], []
    bar = progress(len(source.paths))
    for b in feature_batches(model, source, view, batch_size, num_workers, device):
        feats.append(b.cls)
        labels.append(b.labels)
        keep.append(b.keep)
        bar.update(len(b.keep))
    bar.close()
    kept = np.concatenate(keep)
    return np.concatenate(feats)[kept], np.concatenate(labels)[kept], np.flatnonzero(kept)


def _compact(path: Path, keep: np.ndarray, chunk: int = 1024) -> None:
    """Rewrite the ``.npy`` file ``path`` with only the rows ``keep`` (chunk by chunk)."""
    src = np.load(path, mmap_mode="r")
    tmp = path.with_name(path.name + ".part")
    dst = open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(int(keep.sum()), *src.shape[1:]))
    rows = np.flatnonzero(keep)
    for i in range(0, len(rows), chunk):
        dst[i : i + chunk] = src[rows[i : i + chunk]]
    dst.flush()
    del dst, src
    os.replace(tmp, path)


def extract_to_files(
    model: nn.Module,
    source: ImageSource,
    view: EvalView,
    out: Path,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
    patch_tokens: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[int, ...]]]:
    """Write ``out/features.npy`` (float32 ``[N, D]``) and, with ``patch_tokens``,
    ``out/patch_tokens.npy`` (float16 ``[N, h, w, D]``), row by row as the batches come.

    Returns ``(labels of all images, which are readable, {file name: shape})``; the files
    hold only the readable images' rows.
    """
    n = len(source.paths)
    files: dict[str, np.ndarray] = {}
    labels = np.full(n, -1, dtype=np.int64)
    keep = np.ones(n, dtype=bool)
    bar = progress(n)
    for b in feature_batches(model, source, view, batch_size, num_workers, device, patch_tokens):
        rows = slice(b.start, b.start + len(b.keep))
        arrays = {"features.npy": b.cls.astype(np.float32)}
        if b.patches is not None:
            arrays["patch_tokens.npy"] = b.patches.astype(np.float16)
        for name, a in arrays.items():
            if name not in files:
                files[name] = open_memmap(out / name, "w+", a.dtype, (n, *a.shape[1:]))
                reserve(out / name, files[name].offset + files[name].nbytes)
            files[name][rows] = a
        labels[rows], keep[rows] = b.labels, b.keep
        bar.update(len(b.keep))
    bar.close()
    shapes = {}
    for name, mm in files.items():
        mm.flush()
        shapes[name] = (int(keep.sum()), *mm.shape[1:])
        del mm
        if not keep.all():
            _compact(out / name, keep)
    files.clear()
    return labels, keep, shapes
