"""Global image features of a frozen backbone: its output ([CLS] for a ViT) for whole images
of any size, optionally averaged over the scales 1, 1/sqrt(2) and 1/2 before L2 normalization
(the multi-scale feature of the paper's retrieval and copy-detection protocols)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dino.eval.image_files import Thumbnail, Transform, image_batches
from dino.eval.patch_features import crop_to_patches
from dino.models.weights import input_stats

#: The scales of the multi-scale feature (bilinear resizes of the input).
SCALES = (1.0, 1 / math.sqrt(2), 0.5)


def patch_multiple(model: nn.Module) -> int | None:
    """The patch size a ViT needs its input to be a multiple of (None for other networks)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        return None
    size = embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


@torch.no_grad()
def global_feature(
    model: nn.Module, x: torch.Tensor, scales: Sequence[float] = (1.0,)
) -> torch.Tensor:
    """L2-normalized ``[B, D]`` output of ``model``, averaged over bilinear rescalings of ``x``
    by ``scales`` first (a ViT input is cropped to whole patches, as its strided patch
    embedding would ignore the rest)."""
    patch = patch_multiple(model)
    total = None
    for s in scales:
        inp = (
            x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        )
        if patch:
            inp = crop_to_patches(inp, patch)
        out = model(inp).float()
        total = out if total is None else total + out
    assert total is not None
    return F.normalize(total / len(scales), dim=1)


def extract_global(
    model: nn.Module,
    paths: Sequence[str | Path],
    transform: Transform,
    multiscale: bool,
    device: torch.device,
    num_workers: int = 0,
    desc: str = "features",
) -> torch.Tensor:
    """L2-normalized global features ``[N, D]`` (float32, CPU) of images, one at a time (the
    images keep their aspect, so sizes differ)."""
    scales = scales_of(multiscale)
    feats = [
        global_feature(model, x.to(device), scales).cpu()
        for x in image_batches(paths, transform, 1, num_workers, desc)
    ]
    return torch.cat(feats)


def scales_of(multiscale: bool) -> tuple[float, ...]:
    """The scales of the feature: the three of the paper, or the image alone."""
    return SCALES if multiscale else (1.0,)


class GlobalFeatures:
    """The global features of images for ``model``: shrunk to ``imsize`` and normalized with
    the model's input statistics, at one scale or the three of ``multiscale``."""

    def __init__(
        self,
        model: nn.Module,
        imsize: int,
        multiscale: bool,
        device: torch.device | str,
        num_workers: int,
    ) -> None:
        self.model, self.multiscale, self.num_workers = model, multiscale, num_workers
        self.device = torch.device(device)
        self.thumb = Thumbnail(imsize, *input_stats(model))

    def __call__(self, paths: Sequence[Path], desc: str) -> torch.Tensor:
        """``[N, D]`` features of the image files ``paths`` (progress labelled ``desc``)."""
        return extract_global(
            self.model, paths, self.thumb, self.multiscale, self.device, self.num_workers, desc
        )

    def one(self, img: Image.Image) -> torch.Tensor:
        """``[1, D]`` feature of one image."""
        x = self.thumb(img)[None].to(self.device)
        return global_feature(self.model, x, scales_of(self.multiscale)).cpu()
