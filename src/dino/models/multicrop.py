"""Backbone + head applied to a list of views of different resolutions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dino.models.backbones import vit_tokens


@dataclass
class MultiCropOutput:
    """What :class:`MultiCropNet` computes for a list of views (``detailed=True``).

    ``logits``: head outputs ``[V*B, K]`` (view-major); ``features``: the backbone's [CLS]
    features ``[V*B, D]``; ``patch_logits``: the patch head's outputs ``[M, K']`` at the ``M``
    selected patches (row-major over views, images, patches), None when none were asked for.
    """

    logits: torch.Tensor
    features: torch.Tensor
    patch_logits: torch.Tensor | None = None


class MultiCropNet(nn.Module):
    """Runs the backbone once per run of same-sized views, then the head once on all features.

    ``forward(views)`` takes a list of ``[B, 3, H_v, W_v]`` tensors and returns the head outputs
    of all views stacked view-major: ``[len(views) * B, out_dim]``.

    For iBOT (``ibot=True``, our ViTs only) the network also holds a mask token and, with
    ``patch_head``, a head of its own for patch tokens (else the head serves both, DINOv2's
    default). ``forward(views, patches=masks, detailed=True)`` on views of one size then returns
    a :class:`MultiCropOutput` whose ``patch_logits`` are the patch head's outputs at the patches
    ``masks`` ``[V*B, N]`` selects; with ``mask_input`` (the student) those patches' embeddings
    are first replaced by the mask token, without it (the teacher) the views are seen whole.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        channels_last: bool = False,
        ibot: bool = False,
        patch_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        #: feed the backbone NHWC tensors (convnets whose weights are channels-last)
        self.channels_last = channels_last
        #: iBOT's mask token (DINOv2 starts it at zero) and separate patch head, if any
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim)) if ibot else None
        self.patch_head = patch_head

    def forward(
        self,
        views: list[torch.Tensor],
        patches: torch.Tensor | None = None,
        mask_input: bool = True,
        detailed: bool = False,
    ) -> torch.Tensor | MultiCropOutput:
        if patches is not None:
            return self._forward_patches(views, patches, mask_input)
        feats = []
        for start, end in same_size_runs(views):
            x = torch.cat(views[start:end])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(self.backbone(x))
        features = torch.cat(feats)
        logits = self.head(features)
        return MultiCropOutput(logits, features) if detailed else logits

    def _forward_patches(
        self, views: list[torch.Tensor], patches: torch.Tensor, mask_input: bool
    ) -> MultiCropOutput:
        if len(same_size_runs(views)) != 1:
            raise ValueError("patch outputs are for views of one size (the global views)")
        masks = patches.reshape(patches.shape[0], -1)
        x = torch.cat(views)
        if mask_input:
            cls, tokens = vit_tokens(self.backbone, x, masks, self.mask_token)
        else:
            cls, tokens = vit_tokens(self.backbone, x)
        selected = tokens[masks]  # [M, D]
        if self.patch_head is None:  # one head for both: one call, then split
            out = self.head(torch.cat([cls, selected]))
            return MultiCropOutput(out[: cls.shape[0]], cls, out[cls.shape[0] :])
        return MultiCropOutput(self.head(cls), cls, self.patch_head(selected))


def same_size_runs(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of consecutive views of one height and width."""
    runs, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            runs.append((start, i))
            start = i
    return runs
