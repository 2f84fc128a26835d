"""Backbone + head applied to a list of views of different resolutions."""

from __future__ import annotations

import torch
from torch import nn


class MultiCropNet(nn.Module):
    """Runs the backbone once per run of same-sized views, then the head once on all features.

    ``forward(views)`` takes a list of ``[B, 3, H_v, W_v]`` tensors and returns the head outputs
    of all views stacked view-major: ``[len(views) * B, out_dim]``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        #: feed the backbone NHWC tensors (convnets whose weights are channels-last)
        self.channels_last = channels_last

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        feats = []
        for start, end in same_size_runs(views):
            x = torch.cat(views[start:end])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(self.backbone(x))
        return self.head(torch.cat(feats))


def same_size_runs(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of consecutive views of one height and width."""
    runs, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            runs.append((start, i))
            start = i
    return runs
