"""The optimizer and its parameter groups (weight decay on weight matrices only)."""

from __future__ import annotations

import torch
from torch import nn

from dino.config import Config


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weight matrices only: biases and 1-D parameters (norms) get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "apply_wd": True},
        {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """``--optimizer``: AdamW (also ``auto``: the reference's default for every backbone), or
    SGD with momentum 0.9, which needs its own learning rate and weight decay (the ``resnet50``
    preset sets them)."""
    groups = param_groups(model)
    if cfg.optim.optimizer in ("adamw", "auto"):
        # The fused kernel updates each parameter in one pass; on CPUs it is 2-3x faster than
        # foreach, which allocates temporaries the size of the model (docs/performance.md).
        if device.type in ("cpu", "cuda"):
            return torch.optim.AdamW(groups, lr=0.0, fused=True)
        return torch.optim.AdamW(groups, lr=0.0, foreach=True)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
