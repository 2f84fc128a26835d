"""Result files of the evaluations: never written over an earlier one, never left half-written.

The dense evaluations (video segmentation, retrieval, copy detection) check their output paths
before computing anything, and write each file to a temporary name that is renamed into place.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON (folders created; written to a temporary file, then renamed)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(out)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file (folders created; written to a temporary file, then renamed)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(out)


def resolve_backbone(backbone: Backbone, device: torch.device) -> nn.Module:
    """The module a :data:`Backbone` names, frozen, on ``device``."""
    from dino.eval.api import as_backbone

    if callable(backbone) and not isinstance(backbone, nn.Module):
        return backbone().to(device).eval()
    return as_backbone(backbone, device)
