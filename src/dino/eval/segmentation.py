"""How well a ViT's attention and patch features segment objects: Jaccard against true masks.

Per image, three predicted foregrounds, each at the patch grid and upsampled (nearest) to the
pixels of the ground-truth mask:

* **attention**, one mask per head: the [CLS] attention of the last block thresholded to keep
  60 % of its mass (:func:`dino.eval.attention.attention_masks`, the paper's masks);
* **PCA**: the first principal component of the image's patch features thresholded at zero
  (:func:`pca_foreground`, as popularised by DINOv2);
* **centre prior**: no network at all, the disc at the image centre with as many pixels as the
  true mask (:func:`centre_prior`), the baseline a method must beat. (The result also holds
  the disc with as many pixels as each method's own mask, the prior beside each method:
  ``centre_prior_of_best_head_area``, ``centre_prior_of_head_areas`` (each head's, averaged)
  and ``centre_prior_of_pca_area``.)

Reported (percent, averaged over images): ``attention_best_head``, the Jaccard of the head that
scores best on average over the images (one head for the whole set, as the paper's best head);
``attention_mean``, the Jaccard of each head averaged over the heads; ``pca``; ``centre_prior``.

>>> from dino.eval.segmentation import jaccard
>>> import torch
>>> a = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
>>> b = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
>>> float(jaccard(a, b))  # 1 shared pixel of 3 covered
0.3333333432674408
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dino.data.datasets import IMAGE_EXTENSIONS, BadImage, load_image, scan_folder
from dino.errors import DinoError
from dino.eval.attention import (
    attention_masks,
    attention_patch_size,
    cls_attention,
    resized_to_patches,
)

#: Attention mass the paper's masks keep.
MASS = 0.6


def jaccard(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Jaccard index (intersection over union) of boolean masks ``[..., H, W]``, per mask;
    1 when both are empty."""
    pred, truth = pred.bool(), truth.bool()
    inter = (pred & truth).flatten(-2).sum(-1).float()
    union = (pred | truth).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def upsample_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of patch-grid masks or maps ``[..., h, w]`` to ``size``
    ``(H, W)``: pixel ``(y, x)`` takes patch ``(y h // H, x w // W)``."""
    h, w = grid.shape[-2:]
    rows = torch.arange(size[0]) * h // size[0]
    cols = torch.arange(size[1]) * w // size[1]
    return grid[..., rows, :][..., cols]


@lru_cache(maxsize=8)
def _centre_rank(size: tuple[int, int]) -> torch.Tensor:
    """``[H, W]``: each pixel's rank by distance to the image centre (ties by pixel order)."""
    h, w = size
    ys = torch.arange(h, dtype=torch.float64)[:, None] + 0.5 - h / 2
    xs = torch.arange(w, dtype=torch.float64)[None, :] + 0.5 - w / 2
    order = torch.sort((ys**2 + xs**2).flatten(), stable=True).indices
    rank = torch.empty(h * w, dtype=torch.long)
    rank[order] = torch.arange(h * w)
    return rank.view(h, w)


def centre_prior(area: int | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boolean mask ``[..., H, W]`` of the ``area`` pixels nearest the image centre (a disc;
    ties broken by pixel order), so that it has exactly ``area`` pixels; ``area`` may be a
    tensor of areas, one mask each."""
    rank = _centre_rank((int(size[0]), int(size[1])))
    area = torch.as_tensor(area, dtype=torch.long)
    return rank < area[..., None, None]


def patch_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's patch tokens after the final norm: ``[B, h, w, D]``."""
    p = attention_patch_size(model)
    b, _, height, width = images.shape
    tokens = model.forward_features(images)
    start = int(getattr(model, "num_prefix_tokens", 1))
    return tokens[:, start:].reshape(b, height // p, width // p, -1)


def _pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """Projections ``[N, k]`` of rows ``x [N, D]`` on their first ``k`` principal components,
    each component's sign fixed so that its largest loading is positive."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    _u, _s, vh = torch.linalg.svd(x, full_matrices=False)
    vh = vh[:k]
    sign = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
    proj = x @ (vh * sign).T
    if proj.shape[1] < k:  # fewer patches or dimensions than k
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], k - proj.shape[1])], 1)
    return proj


def pca_foreground(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of one image's patch features ``[h, w, D]``: ``(rgb, foreground)``.

    ``rgb`` ``float [h, w, 3]`` in 0..1: the first three principal components, each scaled to
    its own min..max. ``foreground`` ``bool [h, w]``: the patches on one side of zero of the
    first component: the side with the smaller share of the border patches (the background is
    the side that surrounds the picture); on a tie, the side with fewer patches.
    """
    h, w, d = features.shape
    proj = _pca(features.reshape(h * w, d), 3).view(h, w, 3)
    lo = proj.amin((0, 1), keepdim=True)
    hi = proj.amax((0, 1), keepdim=True)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).float()
    first = proj[..., 0]
    side = first > 0
    border = torch.ones(h, w, dtype=torch.bool)
    if h > 2 and w > 2:
        border[1:-1, 1:-1] = False
    share_pos = (side & border).sum() / side.sum().clamp_min(1)
    share_neg = (~side & border).sum() / (~side).sum().clamp_min(1)
    if share_pos < share_neg or (share_pos == share_neg and side.sum() <= (~side).sum()):
        return rgb, side
    return rgb, ~side


@dataclass
class Segmentation:
    """What a ViT makes of a batch of images: per image, the attention ``[heads, h, w]`` of the
    [CLS] query, its 60 %-mass masks, the PCA picture ``[h, w, 3]`` and PCA foreground."""

    attention: torch.Tensor  # [B, heads, h, w]
    masks: torch.Tensor  # [B, heads, h, w] bool
    pca_rgb: torch.Tensor  # [B, h, w, 3]
    pca_mask: torch.Tensor  # [B, h, w] bool


@torch.no_grad()
def segment(model: nn.Module, images: torch.Tensor, mass: float = MASS) -> Segmentation:
    """Attention masks and PCA foregrounds of normalized images ``[B, 3, H, W]`` (H and W
    multiples of the patch size)."""
    attention = cls_attention(model, images).float()
    feats = patch_features(model, images).float().cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small SVDs: threading costs 10x more than it saves
    try:
        pcas = [pca_foreground(f) for f in feats]
    finally:
        torch.set_num_threads(threads)
    return Segmentation(
        attention.cpu(),
        attention_masks(attention, mass).cpu(),
        torch.stack([rgb for rgb, _ in pcas]),
        torch.stack([fg for _, fg in pcas]),
    )


@dataclass
class ScoreSum:
    """Running per-image Jaccard values of a scoring pass."""

    heads: list[torch.Tensor] = field(default_factory=list)  # [B, heads] each
    pca: list[torch.Tensor] = field(default_factory=list)
    centre: list[torch.Tensor] = field(default_factory=list)
    centre_like_heads: list[torch.Tensor] = field(default_factory=list)  # [B, heads] each
    centre_like_pca: list[torch.Tensor] = field(default_factory=list)

    def add(self, seg: Segmentation, truth: torch.Tensor) -> None:
        """Score one batch against its true masks ``bool [B, H, W]``."""
        size = (truth.shape[-2], truth.shape[-1])
        truth = truth.bool().cpu()
        masks = upsample_grid(seg.masks, size)
        self.heads.append(jaccard(masks, truth[:, None]))
        pca = upsample_grid(seg.pca_mask, size)
        self.pca.append(jaccard(pca, truth))
        self.centre_like_pca.append(jaccard(centre_prior(pca.flatten(1).sum(1), size), truth))
        self.centre.append(jaccard(centre_prior(truth.flatten(1).sum(1), size), truth))
        # the disc of each head's mask area: does the head find more than a central blob?
        prior = centre_prior(masks.flatten(2).sum(2), size)
        self.centre_like_heads.append(jaccard(prior, truth[:, None]))

    def result(self, mass: float = MASS) -> dict[str, Any]:
        """``{"jaccard": {...}, "images": N, ...}`` in percent (see the module docstring)."""
        if not self.heads:
            raise DinoError("no image was scored; pass images with their masks")
        heads = torch.cat(self.heads).double()
        per_head = heads.mean(0)
        best = int(per_head.argmax())
        pct = lambda t: round(100.0 * float(t), 2)
        return {
            "jaccard": {
                "attention_best_head": pct(per_head[best]),
                "attention_mean": pct(heads.mean()),
                "pca": pct(torch.cat(self.pca).double().mean()),
                "centre_prior": pct(torch.cat(self.centre).double().mean()),
            },
            "images": int(heads.shape[0]),
            "best_head": best,
            "centre_prior_of_best_head_area": pct(
                torch.cat(self.centre_like_heads)[:, best].mean()
            ),
            "centre_prior_of_head_areas": pct(torch.cat(self.centre_like_heads).double().mean()),
            "centre_prior_of_pca_area": pct(torch.cat(self.centre_like_pca).double().mean()),
            "per_head": [pct(v) for v in per_head],
            "mass": mass,
        }


def normalize(images: torch.Tensor, mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` -> normalized float."""
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def score_tensors(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    mean: Iterable[float],
    std: Iterable[float],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: Any = None,
    mass: float = MASS,
) -> dict[str, Any]:
    """Jaccard scores of ``uint8 [N, 3, H, W]`` images against ``bool [N, H, W]`` masks, the
    attention masks keeping ``mass`` of each head's attention; ``progress(n)`` after each
    batch."""
    if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
        raise DinoError(
            f"{images.shape[0]} images of {tuple(images.shape[-2:])} and {masks.shape[0]} "
            f"masks of {tuple(masks.shape[-2:])}: every image needs a mask of its size"
        )
    p = attention_patch_size(model)
    h, w = images.shape[-2:]
    if h % p or w % p:
        raise DinoError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    sums = ScoreSum()
    mean, std = list(mean), list(std)
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start : start + batch_size], mean, std).to(device)
        sums.add(segment(model, x, mass), masks[start : start + batch_size])
        if progress is not None:
            progress(x.shape[0])
    return sums.result(mass)


# ------------------------------------------------------------------ a folder of images + masks


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as ``bool [H, W]``: every non-zero pixel is foreground (a palette PNG's
    indices, a gray or RGB image's values)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                arr = np.asarray(im)
            elif im.mode in ("RGBA", "LA"):
                arr = np.asarray(im.convert("RGB"))
            else:
                arr = np.asarray(im)
    except Exception as exc:
        raise DinoError(f"cannot read the mask {path} ({exc}); masks must be image files") from None
    if arr.ndim == 3:
        arr = arr.max(-1)
    return arr > 0


def paired_files(images: str | Path, masks: str | Path) -> list[tuple[str, Path]]:
    """Each image below ``images`` with its mask: the file of ``masks`` with the same relative
    path and stem (any image extension, PNG first)."""
    root, mroot = Path(images), Path(masks)
    if not mroot.is_dir():
        raise DinoError(f"--masks {mroot} is not a folder; pass the folder of mask PNGs")
    files, _labels, _classes = scan_folder(root)
    pairs, missing = [], []
    for f in files:
        rel = Path(f).relative_to(root).with_suffix("")
        candidates = [mroot / rel.with_suffix(".png")] + [
            mroot / rel.with_suffix(ext) for ext in sorted(IMAGE_EXTENSIONS) if ext != ".png"
        ]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            missing.append(str(rel) + ".png")
        else:
            pairs.append((str(f), found))
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise DinoError(
            f"{len(missing)} of {len(files)} images have no mask in {mroot} (missing: {shown}); "
            "give every image a mask file with the same name"
        )
    return pairs


def prepare_pair(
    image: Image.Image, mask: np.ndarray, patch: int, image_size: int | None, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """An image and its mask, resized alike (shorter side to ``image_size``; the mask by
    nearest neighbour) and center-cropped to multiples of the patch size:
    ``(uint8 [3, H, W], bool [H, W])``."""
    if mask.shape != (image.height, image.width):
        raise DinoError(
            f"the mask of {name} is {mask.shape[1]}x{mask.shape[0]} pixels but the image is "
            f"{image.width}x{image.height}; each mask must have its image's size"
        )
    m = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    size, box = resized_to_patches(image, patch, image_size, name)
    img = image
    if size != image.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
        m = m.resize(size, Image.Resampling.NEAREST)
    pix = torch.from_numpy(np.array(img.crop(box), dtype=np.uint8)).permute(2, 0, 1)
    return pix, torch.from_numpy(np.array(m.crop(box)) > 127)


def folder_pairs(
    images: str | Path, masks: str | Path, patch: int, image_size: int | None
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(path, uint8 image [3, H, W], bool mask [H, W])`` of each image of a folder with its
    mask (:func:`paired_files`, :func:`prepare_pair`); every pair is checked before the first
    is yielded, so a bad one stops the run before any work."""
    pairs = paired_files(images, masks)
    loaded = []
    for path, mpath in pairs:
        try:
            img = load_image(path)
        except BadImage as exc:
            raise DinoError(f"cannot read the image {exc}; fix or remove it") from None
        loaded.append((path, *prepare_pair(img, read_mask(mpath), patch, image_size, path)))
    yield from loaded


def score_folder(
    model: nn.Module,
    images: str | Path,
    masks: str | Path,
    mean: Iterable[float],
    std: Iterable[float],
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    mass: float = MASS,
) -> dict[str, Any]:
    """Jaccard scores of the images of a folder against the masks of ``masks``
    (:func:`folder_pairs`)."""
    patch = attention_patch_size(model)
    sums = ScoreSum()
    mean, std = list(mean), list(std)
    for _path, pix, mask in folder_pairs(images, masks, patch, image_size):
        sums.add(segment(model, normalize(pix[None], mean, std).to(device), mass), mask[None])
    return sums.result(mass)
