"""Result files of the evaluations: never written over an earlier one, never left half-written.

The dense evaluations (video segmentation, retrieval, copy detection) check their output paths
before computing anything, and write each file atomically (:mod:`dino.atomic_files`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dino.atomic_files import write_csv, write_json

__all__ = ["write_json", "write_csv"]  # the ones in dino.atomic_files
from dino.errors import DinoError

#: A backbone as the evaluation functions accept it: a module, weights for
#: :func:`dino.load_backbone`, or a function that returns the module (called once the inputs
#: have been checked, so that a bad path fails before weights are loaded).
Backbone = nn.Module | str | Path | Callable[[], nn.Module]


def refuse_existing(path: str | Path | None, flag: str) -> None:
    """Raise :class:`DinoError` when ``path`` exists: results are never overwritten."""
    if path is not None and Path(path).exists():
        raise DinoError(
            f"{flag} {path} already exists; pass another path, or move the earlier results away"
        )


def resolve_backbone(backbone: Backbone, device: torch.device) -> nn.Module:
    """The module a :data:`Backbone` names, frozen, on ``device``."""
    from dino.eval.api import as_backbone

    if callable(backbone) and not isinstance(backbone, nn.Module):
        return backbone().to(device).eval()
    return as_backbone(backbone, device)
