"""The linear probe's networks: the frozen backbone's probe features (the [CLS] tokens of the last
blocks, optionally with the pooled patch tokens, for ViTs; the output for convnets) and the linear
classifier on them, initialized as the reference does; with its top-1/top-5 count and schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from dino.errors import DinoError


def is_vit(backbone: nn.Module) -> bool:
    return hasattr(backbone, "forward_intermediates") and hasattr(backbone, "blocks")


def default_probe(backbone: nn.Module) -> tuple[int, bool]:
    """The reference protocol's (n_last_blocks, avgpool): (1, True) for ViT-B-sized and wider
    ViTs, else (4, False)."""
    if is_vit(backbone) and int(getattr(backbone, "embed_dim", 0)) >= 768:
        return 1, True
    return 4, False


class ProbeFeatures(nn.Module):
    """Frozen backbone -> the linear probe's input ``[B, out_dim]``.

    Args:
        backbone: a timm ViT (uses ``forward_intermediates``) or any backbone whose output is
            the feature (convnets; ``n_last_blocks`` and ``avgpool`` are then ignored).
        n_last_blocks: concatenate the normalized [CLS] tokens of this many last blocks.
        avgpool: also concatenate the mean of the last block's normalized patch tokens.
    """

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 4, avgpool: bool = False) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.vit = is_vit(backbone)
        depth = len(backbone.blocks) if self.vit else 1
        if n_last_blocks < 1:
            raise DinoError(f"n_last_blocks must be at least 1, got {n_last_blocks}")
        self.n_last_blocks = min(n_last_blocks, depth) if self.vit else 1
        self.avgpool = avgpool and self.vit
        dim = int(backbone.embed_dim)
        self.out_dim = dim * (self.n_last_blocks + int(self.avgpool)) if self.vit else dim

    def train(self, mode: bool = True) -> ProbeFeatures:
        super().train(False)  # the backbone stays in eval mode
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.vit:
            return self.backbone(x)
        outs = self.backbone.forward_intermediates(
            x,
            indices=self.n_last_blocks,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
        feats = [prefix[:, 0] for _patches, prefix in outs]
        if self.avgpool:
            feats.append(outs[-1][0].mean(dim=1))
        return torch.cat(feats, dim=-1)


class LinearClassifier(nn.Module):
    """One linear layer, weights from N(0, 0.01), zero bias (the reference's initialization)."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def cosine_lr(peak: float, step: int, total: int) -> float:
    """Cosine decay from ``peak`` at step 0 to 0 at ``total``."""
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Numbers of top-1 and top-5 hits."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(1).sum())
