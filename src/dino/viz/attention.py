"""Self-attention maps of a ViT (docs/recipe.md, "Evaluation protocols").

The map of a head is the attention of the [CLS] query to every patch in the last block, and a
head's mask keeps the patches that together hold ``threshold`` (60%) of its attention mass (both
computed in :mod:`dino.eval.attention`). Pictures are written with PIL alone
(:mod:`dino.viz.drawing`).

>>> from dino import load_backbone
>>> from dino.viz.attention import save_attention_maps
>>> model = load_backbone("dino_vits16")  # doctest: +SKIP
>>> save_attention_maps(model, "photo.jpg", "attention/")  # doctest: +SKIP
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dino.atomic_files import atomic_write
from dino.data.datasets import BadImage, load_image
from dino.errors import DinoError
from dino.eval.attention import attention_masks, attention_patch_size, cls_attention
from dino.models.weights import input_stats
from dino.viz.drawing import (
    colorize,
    overlay,
    panel,
    prepare_image,
    save_head_maps,
    sheet,
    upsample,
)


def overview(
    picture: Image.Image,
    attention: np.ndarray,
    masks: np.ndarray,
    panel_height: int = 160,
    columns: int = 8,
) -> Image.Image:
    """One picture: original | each head's map | mean map | mask overlay, in rows of panels."""
    heads = [Image.fromarray(colorize(upsample(a, picture.size))) for a in attention]
    mean = Image.fromarray(colorize(upsample(attention.mean(0), picture.size)))
    panels = [panel(picture, "image", panel_height)]
    panels += [panel(im, f"head {i}", panel_height) for i, im in enumerate(heads)]
    panels.append(panel(mean, "mean", panel_height))
    panels.append(panel(overlay(picture, masks), "masks", panel_height))
    columns = max(1, min(columns, len(panels)))
    return sheet([panels[i : i + columns] for i in range(0, len(panels), columns)])


def default_image_size(run_config: dict | None) -> int:
    """The side attention maps are drawn at by default: the run's crop size when it trained on
    crops under 224 (small-image runs), else 480 (photos, as the reference's visualizations)."""
    crop = int(((run_config or {}).get("data") or {}).get("global_size") or 224)
    return crop if crop < 224 else 480


def save_attention_maps(
    model: nn.Module,
    image: str | Path | Image.Image,
    output_dir: str | Path,
    image_size: int | None = None,
    threshold: float = 0.6,
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, object]:
    """Compute and save the attention maps of one image; returns what was written.

    Writes into ``output_dir``: ``attn-head<i>.png`` (heat map of head i, at the picture's
    size), ``attn-mean.png``, ``mask-head<i>.png`` (white: kept patches), ``overview.png``
    (original | heads | mean | mask overlay), ``image.png`` (the cropped input) and
    ``attention.npy`` (``[heads, h, w]`` float32 probabilities).

    Args:
        model: a ViT backbone (:func:`dino.load_backbone`).
        image: a file of any mode and size, or a PIL image.
        output_dir: created if needed.
        image_size: resize the shorter side to this first (None: keep the size); the picture
            is then center-cropped to multiples of the patch size.
        threshold: attention mass the masks keep (0.6 in the paper).
        mean, std: input normalization (default: the model's ``weights_info`` or ImageNet).
        device: where to run the model.
    """
    if not 0 < threshold <= 1:
        raise DinoError(f"threshold must be in (0, 1], got {threshold}")
    run_mean, run_std = input_stats(model)
    mean, std = mean or run_mean, std or run_std
    patch = attention_patch_size(model)
    if isinstance(image, Image.Image):
        pil = image
    else:
        try:
            pil = load_image(image)
        except BadImage as exc:
            raise DinoError(f"cannot read the image {exc}; pass a readable image file") from None
    x, picture = prepare_image(pil, patch, image_size, mean, std)
    attention = cls_attention(model, x.to(device))[0].float().cpu()
    masks = attention_masks(attention, threshold)
    out = Path(output_dir)
    att, msk = attention.numpy(), masks.numpy()
    mask_pictures = [
        Image.fromarray((upsample(m, picture.size) * 255).astype(np.uint8), "L") for m in msk
    ]
    written = save_head_maps(out, picture, att, mask_pictures)
    overview(picture, att, msk).save(out / "overview.png")
    written.append(out / "overview.png")
    atomic_write(out / "attention.npy", lambda f: np.save(f, att.astype(np.float32)))
    return {
        "overview": out / "overview.png",
        "files": written + [out / "attention.npy"],
        "attention": attention,
        "masks": masks,
        "patch_grid": tuple(att.shape[1:]),
    }
