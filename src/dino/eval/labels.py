"""Few-label evaluation: a seeded random subset of the labeled training images, and the mean and
spread of a result over several such subsets (``--labels-per-class``, ``--label-seeds``).

With ``n`` labels per class, subset ``s`` holds ``n`` training images of every class drawn
without replacement by a generator seeded with ``s`` (all of a class's images when it has fewer);
the same ``(n, s)`` always gives the same images, so every method compared on it sees the same
labels. The subsets of one seed are nested: the first ``n`` of a class's seeded order are also
the first ``m < n``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dino.data.datasets import ImageFiles, TensorImages
from dino.errors import DinoError

Data = TensorImages | ImageFiles


def labels_array(data: Data) -> np.ndarray:
    """The labels of a labeled split as an ``int64`` array."""
    if isinstance(data, TensorImages):
        if data.labels is None:
            raise DinoError(f"{data.name} has no labels; few-label evaluation needs class labels")
        return data.labels.numpy().astype(np.int64)
    return np.asarray(data.labels, dtype=np.int64)


def per_class_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices (sorted) of ``per_class`` images of every class, drawn with seed ``seed``."""
    if per_class < 1:
        raise DinoError(f"--labels-per-class must be at least 1, got {per_class}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))  # one seeded order of all images, split by class
    chosen = [order[labels[order] == c][:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def take(data: Data, indices: np.ndarray) -> Data:
    """The images ``indices`` of ``data``, as the same kind of dataset."""
    if isinstance(data, TensorImages):
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        labels = None if data.labels is None else data.labels[idx]
        return TensorImages(data.images[idx], labels, data.classes, data.name)
    files = ([data.files[int(i)] for i in indices], data.labels[indices], data.classes)
    return ImageFiles(data.root, data.transform, data.seed, files=files)


def labeled_subset(data: Data, per_class: int, seed: int) -> Data:
    """``per_class`` seeded images of every class of ``data`` (see the module docstring)."""
    return take(data, per_class_indices(labels_array(data), per_class, seed))


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "min", "max"}`` of the values (``std``: sample standard deviation, 0
    for one value)."""
    v = np.asarray(values, dtype=np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max())}


def spread_over_seeds(
    results: Sequence[dict[str, dict[str, float]]],
) -> dict[str, dict[str, float]]:
    """One ``{key: {metric: value}}`` result per label seed (k-NN's ``{"20": {"top1", "top5"}}``)
    -> the mean of each metric with its spread: ``{"20": {"top1", "top1_std", "top5", ...}}``."""
    out: dict[str, dict[str, float]] = {}
    for key in results[0]:
        out[key] = {}
        for metric in results[0][key]:
            stats = mean_spread([r[key][metric] for r in results])
            out[key][metric] = stats["mean"]
            out[key][f"{metric}_std"] = stats["std"]
    return out


def check_label_args(per_class: int, seeds: Sequence[int]) -> list[int]:
    """The label seeds to use; a DinoError for values a user can get wrong."""
    if per_class < 0:
        raise DinoError(f"--labels-per-class must be 0 (all labels) or more, got {per_class}")
    seeds = [int(s) for s in seeds] or [0]
    if len(set(seeds)) != len(seeds):
        raise DinoError(f"--label-seeds repeats a seed ({seeds}); give distinct seeds")
    if per_class == 0 and len(seeds) > 1:
        raise DinoError(
            "--label-seeds needs --labels-per-class: with all labels every seed is the same set"
        )
    if any(s < 0 or s >= 2**32 for s in seeds):
        raise DinoError(f"--label-seeds must be in [0, 4294967295], got {seeds}")
    return seeds
