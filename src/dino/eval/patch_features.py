"""Token features of a frozen ViT: the [CLS] token and the patch grid of its last block.

The dense evaluations (video segmentation by label propagation, copy detection) read the output
tokens of the last block after the final LayerNorm, as the reference's
``get_intermediate_layers(x, n=1)`` does; our ViTs are timm ``VisionTransformer`` instances, whose
``forward_features`` returns exactly those tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from dino.errors import DinoError


def vit_patch_size(model: nn.Module, what: str = "this evaluation") -> int:
    """The patch size of a ViT backbone; a convnet (no patch grid) is a user error here."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(model, "forward_features"):
        arch = getattr(getattr(model, "weights_info", None), "arch", type(model).__name__)
        raise DinoError(
            f"{what} reads the patch tokens of a ViT, and {arch} is not one; pass ViT weights "
            "(a vit_* run, dino_vits16, dino_vitb8 ...)"
        )
    size = embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def crop_to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Drop the bottom rows and right columns that do not fill a whole patch (what the
    reference ViT's strided patch convolution ignores), so that any image size is accepted."""
    h, w = x.shape[-2:]
    if h < patch or w < patch:
        raise DinoError(
            f"an image of {w}x{h} px is smaller than one {patch}x{patch} patch; use larger "
            "images or a larger --imsize"
        )
    return x[..., : h - h % patch, : w - w % patch]


@torch.no_grad()
def cls_and_patch_tokens(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, D] [CLS] tokens, [B, h, w, D] patch tokens)`` of the last block, after the final
    norm, for normalized images ``x`` ``[B, 3, H, W]`` (cropped to whole patches first)."""
    patch = vit_patch_size(model)
    x = crop_to_patches(x, patch)
    tokens = model.forward_features(x)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    patches = tokens[:, prefix:]
    if patches.shape[1] != h * w:
        raise DinoError(
            f"the backbone returned {patches.shape[1]} patch tokens for a {h}x{w} patch grid; "
            "only plain ViTs (one token per patch) are supported here"
        )
    return tokens[:, 0], patches.reshape(x.shape[0], h, w, -1)
