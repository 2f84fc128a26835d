"""Self-attention maps of a ViT (docs/recipe.md, "Evaluation protocols").

The map of a head is the attention of the [CLS] query to every patch in the last block:
``softmax(q_cls k^T / sqrt(d))`` over the tokens, computed explicitly here (the fused kernels
never materialize it). A head's mask keeps the patches that together hold ``threshold`` (60%) of
its attention mass. Pictures are written with PIL alone.

>>> from dino import load_backbone
>>> from dino.viz.attention import save_attention_maps
>>> model = load_backbone("dino_vits16")  # doctest: +SKIP
>>> save_attention_maps(model, "photo.jpg", "attention/")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dino.data.datasets import BadImage, load_image
from dino.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from dino.errors import DinoError
from dino.viz.sheets import panel, sheet

#: Anchor colors of the heat-map color scale (dark blue -> purple -> orange -> light yellow).
_COLORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
#: Colors of the heads in the mask overlay.
_HEAD_COLORS = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
    ],
    dtype=np.float64,
)


def vit_patch_size(model: nn.Module) -> int:
    """The patch size of a timm ViT; a DinoError for other backbones."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(model, "blocks"):
        raise DinoError(
            "attention maps need a ViT backbone; this one is a "
            f"{type(getattr(model, 'net', model)).__name__}"
        )
    size = embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last-block attention of [CLS] to every patch: ``[B, heads, H / p, W / p]``.

    ``images`` are normalized ``[B, 3, H, W]`` with H and W multiples of the patch size ``p``.
    The blocks before the last run as usual; for the last one the attention probabilities
    ``softmax(q k^T * scale)`` are computed from its ``norm1`` and ``attn`` (qkv, q/k norms).
    """
    p = vit_patch_size(model)
    b, _, h, w = images.shape
    if h % p or w % p:
        raise DinoError(f"image size {h}x{w} is not a multiple of the patch size {p}; crop it")
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for block in model.blocks[:-1]:
        x = block(x)
    last = model.blocks[-1]
    attn = last.attn
    y = last.norm1(x)
    n = y.shape[1]
    qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, h, 1, N]
    start = getattr(model, "num_prefix_tokens", 1)
    return probs[:, :, 0, start:].reshape(b, attn.num_heads, h // p, w // p)


def attention_masks(attention: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """Boolean masks ``[..., h, w]`` keeping, per map, the fewest highest-attention patches that
    together hold at least ``threshold`` of the map's attention mass."""
    shape = attention.shape
    flat = attention.reshape(-1, shape[-2] * shape[-1]).float()
    values, order = flat.sort(dim=1, descending=True)
    mass = values.cumsum(dim=1) / values.sum(dim=1, keepdim=True).clamp_min(1e-12)
    before = mass - values / values.sum(dim=1, keepdim=True).clamp_min(1e-12)
    keep_sorted = before < threshold  # the patch is needed to reach the threshold
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep.reshape(shape)


#: The most patches an image may have for its attention maps: 128 x 128, e.g. 2048 px with
#: 16-px patches (each block then holds a 16384 x 16384 attention matrix per head).
MAX_PATCHES = 16384


def prepare_image(
    image: Image.Image,
    patch_size: int,
    image_size: int | None,
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
) -> tuple[torch.Tensor, Image.Image]:
    """Resize the shorter side to ``image_size`` (None: keep the size), center-crop to multiples
    of the patch size; returns the normalized tensor ``[1, 3, H, W]`` and the cropped picture."""
    img = image.convert("RGB")
    if image_size:
        w, h = img.size
        scale = image_size / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    w, h = img.size
    cw, ch = w - w % patch_size, h - h % patch_size
    if cw == 0 or ch == 0:
        raise DinoError(
            f"the image ({w}x{h} after resizing) is smaller than one {patch_size}-pixel patch; "
            "pass a larger --image-size"
        )
    tokens = (cw // patch_size) * (ch // patch_size)
    if tokens > MAX_PATCHES:
        raise DinoError(
            f"the image ({w}x{h} after resizing) makes {tokens} patches of {patch_size} px, "
            f"more than the {MAX_PATCHES} attention maps are drawn for (every block's attention "
            "grows with their square); pass a smaller --image-size, such as 480"
        )
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s)[None], img


def colorize(values: np.ndarray) -> np.ndarray:
    """Map a 2-D array to ``uint8 [h, w, 3]`` colors, scaled to its own min..max."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    t = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    pos = t * (len(_COLORS) - 1)
    i = np.clip(np.floor(pos).astype(int), 0, len(_COLORS) - 2)
    f = (pos - i)[..., None]
    rgb = _COLORS[i] * (1 - f) + _COLORS[i + 1] * f
    return np.round(rgb).astype(np.uint8)


def _upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a patch grid to the picture's ``(width, height)``."""
    w, h = size
    rows = np.minimum((np.arange(h) * grid.shape[0]) // h, grid.shape[0] - 1)
    cols = np.minimum((np.arange(w) * grid.shape[1]) // w, grid.shape[1] - 1)
    return grid[rows][:, cols]


def _overlay(picture: Image.Image, masks: np.ndarray) -> Image.Image:
    """The picture with each head's mask tinted in that head's color."""
    base = np.asarray(picture, dtype=np.float64)
    up = np.stack([_upsample(m.astype(np.float64), picture.size) for m in masks])  # [H, h, w]
    colors = _HEAD_COLORS[np.arange(len(masks)) % len(_HEAD_COLORS)]
    count = up.sum(0)
    tint = np.einsum("khw,kc->hwc", up, colors) / np.maximum(count, 1)[..., None]
    alpha = 0.55 * (count > 0)[..., None]
    out = base * (1 - alpha) + tint * alpha
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def overview(
    picture: Image.Image,
    attention: np.ndarray,
    masks: np.ndarray,
    panel_height: int = 160,
    columns: int = 8,
) -> Image.Image:
    """One picture: original | each head's map | mean map | mask overlay, in rows of panels."""
    heads = [Image.fromarray(colorize(_upsample(a, picture.size))) for a in attention]
    mean = Image.fromarray(colorize(_upsample(attention.mean(0), picture.size)))
    panels = [panel(picture, "image", panel_height)]
    panels += [panel(im, f"head {i}", panel_height) for i, im in enumerate(heads)]
    panels.append(panel(mean, "mean", panel_height))
    panels.append(panel(_overlay(picture, masks), "masks", panel_height))
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
    info = getattr(model, "weights_info", None)
    mean = mean or (info.mean if info else IMAGENET_MEAN)
    std = std or (info.std if info else IMAGENET_STD)
    patch = vit_patch_size(model)
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
    out.mkdir(parents=True, exist_ok=True)
    att, msk = attention.numpy(), masks.numpy()
    written: list[Path] = []

    def save(img: Image.Image, name: str) -> None:
        img.save(out / name)
        written.append(out / name)

    save(picture, "image.png")
    for i in range(att.shape[0]):
        save(Image.fromarray(colorize(_upsample(att[i], picture.size))), f"attn-head{i}.png")
        mask = (_upsample(msk[i], picture.size) * 255).astype(np.uint8)
        save(Image.fromarray(mask, "L"), f"mask-head{i}.png")
    save(Image.fromarray(colorize(_upsample(att.mean(0), picture.size))), "attn-mean.png")
    save(overview(picture, att, msk), "overview.png")
    np.save(out / "attention.npy", att.astype(np.float32))
    return {
        "overview": out / "overview.png",
        "files": written + [out / "attention.npy"],
        "attention": attention,
        "masks": masks,
        "patch_grid": tuple(att.shape[1:]),
    }
