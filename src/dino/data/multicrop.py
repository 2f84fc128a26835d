"""Multi-crop augmentation of one PIL image with torchvision transforms v2 (docs/recipe.md,
"Multi-crop views").

Two global views (blur p 1.0 / 0.1, solarize p 0 / 0.2) and N local views (blur p 0.5), each with
bicubic RandomResizedCrop, flip, color jitter, grayscale and normalization. Callers seed torch's
generator per sample (see :class:`dino.data.datasets.ImageFiles`) so views are reproducible.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from dino.config import DataConfig


def blur_kernel_size(max_sigma: float, size: int) -> int:
    """Taps of the Gaussian blur of a ``size``-pixel view: 3 sigma each side, odd and no larger
    than the view (both augmentation paths)."""
    return max(min(2 * math.ceil(3 * max_sigma) + 1, size - (1 - size % 2)), 1)


def _blur(sigma: tuple[float, float], size: int) -> v2.Transform:
    return v2.GaussianBlur(kernel_size=blur_kernel_size(sigma[1], size), sigma=tuple(sigma))


def view_transform(
    cfg: DataConfig, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float
) -> v2.Compose:
    """The augmentation of one view, ending in a normalized float tensor."""
    steps: list[v2.Transform] = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(
            size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True
        ),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply(
            [v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
            p=cfg.color_jitter_p,
        ),
        v2.RandomGrayscale(p=cfg.grayscale_p),
    ]
    if blur_p > 0:
        steps.append(v2.RandomApply([_blur(tuple(cfg.blur_sigma), size)], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(steps)


class MultiCropTransform:
    """``img -> [global_1, global_2, local_1, ..., local_N]`` (normalized float tensors)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.global1 = view_transform(
            cfg, cfg.global_size, cfg.global_scale, cfg.blur_p[0], cfg.solarize_p[0]
        )
        self.global2 = view_transform(
            cfg, cfg.global_size, cfg.global_scale, cfg.blur_p[1], cfg.solarize_p[1]
        )
        self.local = view_transform(
            cfg, cfg.local_size, cfg.local_scale, cfg.blur_p[2], cfg.solarize_p[2]
        )
        self.local_crops = cfg.local_crops

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        views = [self.global1(img), self.global2(img)]
        views += [self.local(img) for _ in range(self.local_crops)]
        return views


def eval_transform(
    resize: int, crop: int, mean: list[float] | tuple, std: list[float] | tuple
) -> v2.Compose:
    """Resize the shorter side (bicubic) + center crop + normalize, for PIL images or uint8
    tensors: the k-NN / linear-probe evaluation view."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(crop),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
