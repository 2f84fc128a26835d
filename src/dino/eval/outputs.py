"""Result files of the evaluations: never written over an earlier one, never left half-written.

The dense evaluations (video segmentation, retrieval, copy detection) check their output paths
before computing anything, and write each file atomically (:mod:`dino.atomic_files`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino.atomic_files import atomic_write
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
    """Write ``obj`` as JSON (folders created; atomically: a kill leaves no torn file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file (folders created; atomically: a kill leaves no torn file)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write(buf.getvalue().encode()))


def resolve_backbone(backbone: Backbone, device: torch.device) -> nn.Module:
    """The module a :data:`Backbone` names, frozen, on ``device``."""
    from dino.eval.api import as_backbone

    if callable(backbone) and not isinstance(backbone, nn.Module):
        return backbone().to(device).eval()
    return as_backbone(backbone, device)
