"""Batched multi-crop augmentation on tensors, on the training device.

The same per-view pipeline as :mod:`dino.data.multicrop` (RECIPE.md): RandomResizedCrop (bicubic),
horizontal flip, color jitter (random order of brightness, contrast, saturation, hue), grayscale,
Gaussian blur, solarization, normalization, but applied to a whole batch at once: the crop,
resize and flip of every sample are one ``grid_sample`` call, the blur one grouped convolution.
Random parameters come from :mod:`dino.data.seeding`, one key per (seed, epoch, sample, view),
so a sample's views are the same whatever the batch it lands in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dino.data.seeding import sample_keys, uniforms

_ATTEMPTS = 10
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_N_DRAWS = 4 * _ATTEMPTS + 14


@dataclass(frozen=True)
class ViewSpec:
    """The augmentation of one view."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


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


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1 - f) * b).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    dsafe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / dsafe, (maxc - g) / dsafe, (maxc - b) / dsafe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Channel ``n`` (5, 3, 1 for R, G, B) is ``v - v s clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6h) mod 6``: the six-sector table in closed form, without building the table
    (5x faster on CPUs)."""
    h, s, v = x.unbind(1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6.0 * h[:, None]) % 6.0
    return v[:, None] - (v * s)[:, None] * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(hsv)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each image with its own sigma: separable grouped convolution, reflect padding."""
    b, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3 * max_sigma)), (min(h, w) - 1)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].to(x.dtype)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, 2r+1]
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


class TensorMultiCrop:
    """Batched multi-crop: ``uint8 [B, C, H, W]`` images (C = 1 or 3) -> list of normalized views.

    Args:
        views: one :class:`ViewSpec` per view, global views first.
        brightness, contrast, saturation, hue: color jitter strengths.
        color_jitter_p, grayscale_p: probabilities of the jitter and of grayscale.
        blur_sigma: (min, max) sigma of the Gaussian blur, in pixels of the output view.
        mean, std: normalization (RGB).
    """

    def __init__(
        self,
        views: list[ViewSpec],
        brightness: float,
        contrast: float,
        saturation: float,
        hue: float,
        color_jitter_p: float,
        grayscale_p: float,
        blur_sigma: tuple[float, float],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.views = views
        self.jitter = (brightness, contrast, saturation, hue)
        self.color_jitter_p = color_jitter_p
        self.grayscale_p = grayscale_p
        self.blur_sigma = blur_sigma
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(
        self, images: torch.Tensor, indices: np.ndarray, epoch: int, seed: int
    ) -> list[torch.Tensor]:
        x = images.float().div_(255)
        return [
            self.view(x, uniforms(sample_keys(seed, epoch, indices, stream=v), _N_DRAWS), spec)
            for v, spec in enumerate(self.views)
        ]

    def view(self, x: torch.Tensor, u: np.ndarray, spec: ViewSpec) -> torch.Tensor:
        """One view of every image of ``x`` (float in [0, 1]) from the uniforms ``u``."""
        b, c, height, width = x.shape
        dev = x.device
        boxes = crop_boxes(u[:, : 4 * _ATTEMPTS], height, width, spec.scale)
        u = torch.from_numpy(u[:, 4 * _ATTEMPTS :]).to(dev, torch.float32)
        flip = u[:, 0] < 0.5
        # crop + bicubic resize + flip as one affine sampling (align_corners=False convention)
        top, left, h, w = (torch.from_numpy(boxes[:, i]).to(dev, torch.float32) for i in range(4))
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = torch.where(flip, -w / width, w / width)
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * top + h) / height - 1
        grid = F.affine_grid(theta, [b, c, spec.size, spec.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
        x = x.clamp_(0, 1)
        x = self._color_jitter(x, u)
        if c == 3:
            gray = (u[:, 10] < self.grayscale_p).view(-1, 1, 1, 1)
            x = torch.where(gray, _gray(x).expand_as(x), x)
        blur = u[:, 11] < spec.blur_p
        if blur.any():
            lo, hi = self.blur_sigma
            sigma = lo + (hi - lo) * u[blur, 12]
            x[blur] = _gaussian_blur(x[blur], sigma, hi)
        solar = (u[:, 13] < spec.solarize_p).view(-1, 1, 1, 1)
        x = torch.where(solar & (x >= 128 / 255), 1 - x, x)
        if c == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean.to(dev)) / self.std.to(dev)

    def _color_jitter(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """ColorJitter with probability p, its 4 operations in a random order per sample.

        For one-channel (gray) images saturation and hue are the identity and are skipped.
        """
        apply = u[:, 1] < self.color_jitter_p
        bright, contr, sat, hue = self.jitter
        factors = [
            1 + bright * (2 * u[:, 2] - 1),
            1 + contr * (2 * u[:, 3] - 1),
            1 + sat * (2 * u[:, 4] - 1),
            hue * (2 * u[:, 5] - 1),
        ]
        order = torch.argsort(u[:, 6:10], dim=1)  # a uniform random permutation per sample
        gray_input = x.shape[1] == 1
        for step in range(4):
            for op in range(4):
                if gray_input and op >= 2:
                    continue
                sel = apply & (order[:, step] == op)
                if not sel.any():
                    continue
                xs, f = x[sel], factors[op][sel].view(-1, 1, 1, 1)
                if op == 0:
                    xs = (xs * f).clamp_(0, 1)
                elif op == 1:
                    xs = _blend(xs, _gray(xs).mean((1, 2, 3), keepdim=True), f)
                elif op == 2:
                    xs = _blend(xs, _gray(xs), f)
                else:
                    xs = _adjust_hue(xs, f.view(-1))
                x[sel] = xs
        return x
