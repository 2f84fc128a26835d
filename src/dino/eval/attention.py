"""The [CLS] self-attention of a ViT's last block, and the paper's masks of it.

The map of a head is the attention of the [CLS] query to every patch in the last block:
``softmax(q_cls k^T / sqrt(d))`` over the tokens, computed explicitly here (the fused kernels
never materialize it). A head's mask keeps the patches that together hold ``threshold`` (60%) of
its attention mass. :mod:`dino.viz.attention` draws them; :mod:`dino.eval.segmentation` scores
the masks.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from dino.errors import DinoError


def attention_patch_size(model: nn.Module) -> int:
    """The patch size of a timm ViT whose attention maps are wanted; a DinoError for other
    backbones."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(model, "blocks"):
        raise DinoError(
            "attention maps need a ViT backbone; this one is a "
            f"{type(getattr(model, 'net', model)).__name__}"
        )
    size = embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def resized_to_patches(
    img: Image.Image, patch: int, image_size: int | None, what: str
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Where an image goes for a ViT's attention: the ``(width, height)`` with the shorter side
    ``image_size`` (None: the image's own), and the centered crop box of whole patches in it; a
    :class:`DinoError` naming ``what`` when it is smaller than one patch."""
    w, h = img.size
    if image_size:
        scale = image_size / min(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    cw, ch = w - w % patch, h - h % patch
    if cw == 0 or ch == 0:
        raise DinoError(
            f"{what} ({w}x{h}) is smaller than one {patch}-pixel patch; pass a larger --image-size"
        )
    left, top = (w - cw) // 2, (h - ch) // 2
    return (w, h), (left, top, left + cw, top + ch)


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last-block attention of [CLS] to every patch: ``[B, heads, H / p, W / p]``.

    ``images`` are normalized ``[B, 3, H, W]`` with H and W multiples of the patch size ``p``.
    The blocks before the last run as usual; for the last one the attention probabilities
    ``softmax(q k^T * scale)`` are computed from its ``norm1`` and ``attn`` (qkv, q/k norms).
    """
    p = attention_patch_size(model)
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
