"""Pictures of ``dino segment``: per image the attention of each head, its 60 %-mass masks, the
PCA of the patch features and its foreground; and sheets of several images for the docs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dino.eval.segmentation import Segmentation
from dino.viz.attention import _overlay, _upsample, colorize
from dino.viz.pca import foreground_picture, mask_picture, pca_picture
from dino.viz.sheets import panel, sheet


def segment_panels(
    picture: Image.Image,
    seg: Segmentation,
    i: int,
    truth: torch.Tensor | None = None,
    height: int = 128,
) -> list[Image.Image]:
    """Titled panels of image ``i`` of ``seg``: image | true mask | each head's attention |
    the heads' masks | PCA | PCA foreground."""
    size = picture.size
    att = seg.attention[i].numpy()
    masks = seg.masks[i].numpy()
    panels = [panel(picture, "image", height)]
    if truth is not None:
        panels.append(panel(mask_picture(truth, size), "true mask", height))
    for h in range(att.shape[0]):
        heat = Image.fromarray(colorize(_upsample(att[h], size)))
        panels.append(panel(heat, f"head {h}", height))
    panels.append(panel(_overlay(picture, masks), "60% masks", height))
    panels.append(panel(pca_picture(seg.pca_rgb[i], size), "PCA", height))
    fg = foreground_picture(seg.pca_rgb[i], seg.pca_mask[i], size)
    panels.append(panel(fg, "PCA foreground", height))
    return panels


def segmentation_sheet(
    pictures: list[Image.Image],
    seg: Segmentation,
    truths: torch.Tensor | None = None,
    height: int = 128,
) -> Image.Image:
    """One row of :func:`segment_panels` per image."""
    rows = [
        segment_panels(p, seg, i, None if truths is None else truths[i], height)
        for i, p in enumerate(pictures)
    ]
    return sheet(rows)


def save_segmentation(
    picture: Image.Image,
    seg: Segmentation,
    i: int,
    output_dir: str | Path,
    truth: torch.Tensor | None = None,
) -> list[Path]:
    """Write image ``i`` of ``seg`` into ``output_dir``: ``image.png``, ``attn-head<h>.png``
    (heat map), ``mask-head<h>.png`` (white: kept patches), ``attn-mean.png``, ``pca.png``,
    ``pca-foreground.png``, ``true-mask.png`` (when known), ``overview.png`` (all of them in a
    row), ``attention.npy`` (``[heads, h, w]`` float32). Returns the paths written."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = picture.size
    att = seg.attention[i].numpy()
    written: list[Path] = []

    def save(img: Image.Image, name: str) -> None:
        img.save(out / name)
        written.append(out / name)

    save(picture, "image.png")
    for h in range(att.shape[0]):
        save(Image.fromarray(colorize(_upsample(att[h], size))), f"attn-head{h}.png")
        save(mask_picture(seg.masks[i, h], size).convert("L"), f"mask-head{h}.png")
    save(Image.fromarray(colorize(_upsample(att.mean(0), size))), "attn-mean.png")
    save(pca_picture(seg.pca_rgb[i], size), "pca.png")
    save(foreground_picture(seg.pca_rgb[i], seg.pca_mask[i], size), "pca-foreground.png")
    if truth is not None:
        save(mask_picture(truth, size).convert("L"), "true-mask.png")
    save(sheet([segment_panels(picture, seg, i, truth)]), "overview.png")
    np.save(out / "attention.npy", att.astype(np.float32))
    written.append(out / "attention.npy")
    return written
