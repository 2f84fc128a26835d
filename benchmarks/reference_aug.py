"""The reference implementation's multi-crop augmentation, rebuilt for timing comparisons.

Follows the definition of ``DataAugmentationDINO`` in facebookresearch/dino (``main_dino.py``)
with torchvision's PIL-based transforms, as that code runs: per view a bicubic
RandomResizedCrop, a horizontal flip with p 0.5, color jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
grayscale with p 0.2, then PIL's Gaussian blur with a radius drawn in [0.1, 2] (p 1.0 for the first
global view, 0.1 for the second, 0.5 for local views), PIL's solarization with p 0.2 on the second
global view, and ``ToTensor`` + ``Normalize``. Images are read as that code reads them: PIL
open + ``convert("RGB")`` (torchvision's ``ImageFolder`` loader). Lives only in ``benchmarks/``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class RandomPILBlur:
    """PIL's Gaussian blur, radius uniform in [lo, hi], applied with probability ``p``."""

    def __init__(self, p: float, lo: float = 0.1, hi: float = 2.0) -> None:
        self.p, self.lo, self.hi = p, lo, hi

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


class RandomPILSolarize:
    """PIL's solarization (threshold 128) with probability ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class ReferenceMultiCrop:
    """``img -> [global_1, global_2, local_1 .. local_n]``, as the reference defines it."""

    def __init__(
        self,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        local_crops: int = 8,
        global_size: int = 224,
        local_size: int = 96,
    ) -> None:
        bicubic = transforms.InterpolationMode.BICUBIC
        jitter = [
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ]
        to_tensor = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]

        def view(size: int, scale: tuple[float, float], extra: list) -> transforms.Compose:
            crop = transforms.RandomResizedCrop(size, scale=scale, interpolation=bicubic)
            return transforms.Compose([crop, *jitter, *extra, *to_tensor])

        self.global1 = view(global_size, global_scale, [RandomPILBlur(1.0)])
        self.global2 = view(global_size, global_scale, [RandomPILBlur(0.1), RandomPILSolarize(0.2)])
        self.local = view(local_size, local_scale, [RandomPILBlur(0.5)])
        self.local_crops = local_crops

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        views = [self.global1(img), self.global2(img)]
        return views + [self.local(img) for _ in range(self.local_crops)]


class ReferenceFolder(torch.utils.data.Dataset):
    """``(views, 0)`` of each file: PIL open + RGB conversion, then the reference's views."""

    def __init__(self, files: list[str], transform: ReferenceMultiCrop) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        with Path(self.files[i]).open("rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img), 0
