"""The DAVIS scores of a video object segmentation, as davis2017-evaluation defines them
(semi-supervised task), computed here so that no other package is needed.

Per object and frame:

* J, region similarity: the Jaccard index |gt and pred| / |gt or pred| of the object's masks (1
  when both are empty);
* F, contour accuracy: the F-measure of the precision and recall of the masks' one-pixel
  boundaries, a boundary pixel matching when the other boundary lies within a disk of
  ``ceil(0.008 x image diagonal)`` px.

An object's J (F) is its mean over the scored frames; a benchmark's J and F are the means over
all objects of all videos, and J&F their mean. Recall is the share of frames scoring above 0.5
and decay the mean of the first quarter of the frames minus that of the last.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: Boundary tolerance of F: this fraction of the image diagonal.
BOUND_TH = 0.008


def jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
    """Region similarity J: |gt and pred| / |gt or pred| of two boolean masks; 1 when both are
    empty."""
    union = np.count_nonzero(gt | pred)
    return 1.0 if union == 0 else np.count_nonzero(gt & pred) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The one-pixel boundary of a boolean mask, as DAVIS draws it: a pixel is on it when it
    differs from its east, south or south-east neighbour (only east on the last row, only south
    on the last column; the bottom-right pixel never), i.e. the boundary sits half a pixel
    towards the origin."""
    m = mask.astype(bool)
    east = np.zeros_like(m)
    south = np.zeros_like(m)
    south_east = np.zeros_like(m)
    east[:, :-1] = m[:, 1:]
    south[:-1, :] = m[1:, :]
    south_east[:-1, :-1] = m[1:, 1:]
    b = (m ^ east) | (m ^ south) | (m ^ south_east)
    b[-1, :] = m[-1, :] ^ east[-1, :]
    b[:, -1] = m[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def _dilate(b: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``b`` by a disk of ``radius`` px (x^2 + y^2 <= r^2)."""
    if radius < 1 or not b.any():
        return b.copy()
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = torch.from_numpy((xx**2 + yy**2 <= radius**2).astype(np.float32))[None, None]
    t = torch.from_numpy(b.astype(np.float32))[None, None]
    return (F.conv2d(t, disk, padding=radius)[0, 0] > 0.5).numpy()


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """Contour accuracy F: the F-measure of boundary precision and recall, a boundary pixel
    counting as matched when the other mask's boundary lies within ``ceil(bound_th x diagonal)``
    px (``bound_th`` px when it is 1 or more). An empty boundary has precision (or recall) 1
    against a non-empty one and 0 the other way; two empty boundaries score 1."""
    h, w = gt.shape
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(h, w)))
    pb, gb = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(pb.sum()), int(gb.sum())
    if n_pred == 0 or n_gt == 0:
        precision = 1.0 if n_pred == 0 else 0.0
        recall = 1.0 if n_gt == 0 else 0.0
    else:
        # dilation only matters near the boundaries: work in their bounding box plus the radius
        ys, xs = np.nonzero(pb | gb)
        y0, y1 = max(0, ys.min() - radius), min(h, ys.max() + radius + 1)
        x0, x1 = max(0, xs.min() - radius), min(w, xs.max() + radius + 1)
        pb, gb = pb[y0:y1, x0:x1], gb[y0:y1, x0:x1]
        precision = np.count_nonzero(pb & _dilate(gb, radius)) / n_pred
        recall = np.count_nonzero(gb & _dilate(pb, radius)) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _statistics(values: list[float]) -> tuple[float, float, float]:
    """(mean, recall = share above 0.5, decay = mean of the first quarter minus the last) of one
    object's per-frame scores, with DAVIS's quarters."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    recall = float((x > 0.5).mean())
    ids = (np.round(np.linspace(1, len(x), 5) + 1e-10) - 1).astype(int)
    first, last = x[ids[0] : ids[1] + 1], x[ids[3] : ids[4] + 1]
    decay = float(first.mean() - last.mean()) if len(first) and len(last) else 0.0
    return mean, recall, decay


def summarize(per_object: list[tuple[list[float], list[float]]]) -> dict[str, Any]:
    """Overall J, F, J&F (means over all objects of all videos), recalls and decays, from the
    per-frame (J, F) lists of every object; objects without a scored frame are skipped."""
    per_object = [(js, fs) for js, fs in per_object if js]
    if not per_object:
        return {"J&F": None, "J": None, "F": None}
    j = [_statistics(js) for js, _ in per_object]
    f = [_statistics(fs) for _, fs in per_object]
    jm, fm = float(np.mean([s[0] for s in j])), float(np.mean([s[0] for s in f]))
    return {
        "J&F": (jm + fm) / 2,
        "J": jm,
        "F": fm,
        "J-recall": float(np.mean([s[1] for s in j])),
        "F-recall": float(np.mean([s[1] for s in f])),
        "J-decay": float(np.mean([s[2] for s in j])),
        "F-decay": float(np.mean([s[2] for s in f])),
        "objects": len(per_object),
    }
