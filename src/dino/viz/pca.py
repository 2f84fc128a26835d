"""Pictures of patch features: the first three principal components as RGB, and the foreground
that thresholding the first component gives (:func:`dino.eval.segmentation.pca_foreground`)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dino.viz.drawing import upsample


def pca_picture(rgb: torch.Tensor | np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The PCA colours ``[h, w, 3]`` (0..1) of a patch grid, upsampled (nearest) to ``size``
    ``(width, height)``."""
    arr = np.asarray(rgb, dtype=np.float64)
    up = np.stack([upsample(arr[..., c], size) for c in range(3)], -1)
    return Image.fromarray(np.clip(np.round(up * 255), 0, 255).astype(np.uint8), "RGB")


def foreground_picture(
    rgb: torch.Tensor | np.ndarray, foreground: torch.Tensor | np.ndarray, size: tuple[int, int]
) -> Image.Image:
    """The PCA colours on the foreground patches, black elsewhere, at ``size``."""
    fg = np.asarray(foreground, dtype=bool)
    arr = np.asarray(rgb, dtype=np.float64) * fg[..., None]
    return pca_picture(arr, size)


def mask_picture(mask: torch.Tensor | np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A boolean grid or pixel mask as a white-on-black picture at ``size``."""
    up = upsample(np.asarray(mask, dtype=np.float64), size)
    return Image.fromarray((up * 255).astype(np.uint8), "L").convert("RGB")
