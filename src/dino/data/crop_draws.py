"""The random geometry of the multi-crop views, shared by the in-memory and the folder paths:
each view's spec, the uniforms of every (seed, epoch, sample, view) (:mod:`dino.data.seeding`),
RandomResizedCrop's box from them (torchvision's rule: 10 attempts, then a central crop), and the
antialiased bicubic resize as a matrix of filter weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dino.config import DataConfig
from dino.data.seeding import sample_keys, uniforms

_ATTEMPTS = 10
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
#: Uniforms per view and sample: the crop box's, then the photometric ones.
CROP_DRAWS = 4 * _ATTEMPTS
#: The uniform that flips a view horizontally (below 0.5): the first photometric one.
FLIP_DRAW = CROP_DRAWS
_N_DRAWS = CROP_DRAWS + 14


@dataclass(frozen=True)
class ViewSpec:
    """The augmentation of one view."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def view_specs(cfg: DataConfig) -> list[ViewSpec]:
    """The recipe's views of ``cfg``: two global views (their own blur and solarization
    probabilities), then ``local_crops`` local views."""
    glob = (cfg.global_size, tuple(cfg.global_scale))
    return [
        ViewSpec(*glob, cfg.blur_p[0], cfg.solarize_p[0]),
        ViewSpec(*glob, cfg.blur_p[1], cfg.solarize_p[1]),
    ] + [
        ViewSpec(cfg.local_size, tuple(cfg.local_scale), cfg.blur_p[2], cfg.solarize_p[2])
    ] * cfg.local_crops


def view_uniforms(seed: int, epoch: int, indices: np.ndarray, n_views: int) -> list[np.ndarray]:
    """Per view, the ``[B, 54]`` uniforms of each sample: :data:`CROP_DRAWS` for the crop box,
    then 14 for the photometric operations (stream ``v`` for view ``v``)."""
    return [uniforms(sample_keys(seed, epoch, indices, stream=v), _N_DRAWS) for v in range(n_views)]


def crop_boxes(u: np.ndarray, height: int, width: int, scale: tuple[float, float]) -> np.ndarray:
    """torchvision's RandomResizedCrop box sampling, vectorized: ``[B, 4]`` (top, left, h, w).

    ``u`` holds ``4 * 10`` uniforms per sample (area, log-ratio, top, left for each attempt);
    the first attempt that fits wins, else the central crop with the ratio clamped.
    """
    b = u.shape[0]
    area = height * width
    u = u.reshape(b, _ATTEMPTS, 4)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    ratio = np.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u[..., 1])
    w = np.round(np.sqrt(target * ratio))
    h = np.round(np.sqrt(target / ratio))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    top = np.floor(u[..., 2] * (height - h + 1))
    left = np.floor(u[..., 3] * (width - w + 1))
    first = np.argmax(ok, axis=1)
    rows = np.arange(b)
    boxes = np.stack([top[rows, first], left[rows, first], h[rows, first], w[rows, first]], 1)
    in_ratio = width / height
    if in_ratio < 3 / 4:
        fw, fh = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        fh, fw = height, round(height * (4 / 3))
    else:
        fw, fh = width, height
    fallback = np.array([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=np.float64)
    boxes[~ok.any(axis=1)] = fallback
    return boxes


def _bicubic_aa(x: np.ndarray) -> np.ndarray:
    """The cubic convolution kernel with a = -0.5 (PIL's, and torch's with ``antialias=True``)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_weights(start: np.ndarray, length: np.ndarray, size: int, in_size: int) -> np.ndarray:
    """``[B, size, in_size]`` float32 matrices resizing pixels ``start .. start + length`` of an
    axis of ``in_size`` pixels to ``size`` pixels: bicubic, antialiased when shrinking.

    The weights of torch's ``interpolate(mode="bicubic", antialias=True)`` (PIL's filter), which
    torchvision's ``resized_crop`` runs on the cropped image: the kernel is stretched by the
    shrink factor, cut at the crop's edges and renormalized.
    """
    start = np.asarray(start, np.float64)[:, None, None]
    length = np.asarray(length, np.float64)[:, None, None]
    scale = length / size
    stretch = np.maximum(scale, 1.0)
    support = 2.0 * stretch
    center = scale * (np.arange(size)[None, :, None] + 0.5)
    lo = np.maximum(np.trunc(center - support + 0.5), 0)
    hi = np.minimum(np.trunc(center + support + 0.5), length)
    j = np.arange(in_size)[None, None, :] - start  # input pixel, relative to the crop
    w = np.where((j >= lo) & (j < hi), _bicubic_aa((j - center + 0.5) / stretch), 0.0)
    total = w.sum(-1, keepdims=True)
    return (w / np.where(total != 0, total, 1.0)).astype(np.float32)
