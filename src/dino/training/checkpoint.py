"""Checkpoint files, written atomically (:mod:`dino.atomic_files`).

A kill at any moment leaves either the previous checkpoint or the new one, never a torn file.
``checkpoint.pth`` is always the latest; with ``keep > 0`` it is also saved as
``checkpoint-<iteration>.pth`` (an independent copy, so that damage to one file leaves the
other) and the ``keep`` previous numbered ones stay. Loading a run folder whose
``checkpoint.pth`` is missing or unreadable falls back to the newest loadable numbered one.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from dino.atomic_files import atomic_write, save_torch
from dino.errors import DinoError

LATEST = "checkpoint.pth"
NUMBERED = re.compile(r"checkpoint-(\d+)\.pth$")

log = logging.getLogger("dino")


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, keep: int = 0) -> Path:
    """Write ``state`` as the latest checkpoint of ``run_dir`` (atomically, see
    :mod:`dino.atomic_files`); keep ``keep`` older ones."""
    run_dir = Path(run_dir)
    latest = run_dir / LATEST
    if keep <= 0:
        save_torch(state, latest)
        return latest
    numbered = run_dir / f"checkpoint-{int(state['iteration']):08d}.pth"
    save_torch(state, numbered)
    # an independent copy, not a link: damage to one file leaves the other intact
    atomic_write(latest, lambda f: _copy_into(numbered, f))
    old = sorted(p for p in run_dir.iterdir() if NUMBERED.match(p.name))
    for p in old[: -(keep + 1)]:
        p.unlink(missing_ok=True)
    return latest


def _copy_into(source: Path, f: IO[bytes]) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, f, 1 << 24)


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed midway left in ``run_dir`` (call it only
    while no other process writes there); returns them."""
    stale = [
        p
        for p in Path(run_dir).glob(".*")
        if p.is_file() and re.search(r"\.(tmp|link)-\d+$", p.name)
    ]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds any checkpoint file (loadable or not)."""
    run_dir = Path(run_dir)
    return (run_dir / LATEST).exists() or any(
        NUMBERED.match(p.name) for p in run_dir.glob("checkpoint-*.pth")
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with a clear error if it is not one.

    ``path`` is a checkpoint file or a run folder. For a folder whose ``checkpoint.pth`` is
    missing or unreadable, the newest loadable ``checkpoint-<iteration>.pth`` is loaded instead
    (with a warning).
    """
    path = Path(path)
    if not path.is_dir():
        return _load_file(path, map_location)
    numbered = sorted(
        (p for p in path.glob("checkpoint-*.pth") if NUMBERED.match(p.name)), reverse=True
    )
    try:
        return _load_file(path / LATEST, map_location)
    except DinoError as exc:
        if not numbered:
            raise
        first_error = exc
    for p in numbered:
        try:
            state = _load_file(p, map_location)
        except DinoError:
            continue
        log.warning("%s; loading %s instead", first_error, p)
        return state
    raise DinoError(
        f"{first_error}, and none of the numbered checkpoints of {path} is readable either"
    )


def _load_file(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not path.exists():
        raise DinoError(f"no checkpoint at {path}; pass a run folder written by `dino train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated or foreign file
        why = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200]
        raise DinoError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {why})"
        ) from None
    if not isinstance(state, dict) or "student" not in state or "iteration" not in state:
        raise DinoError(f"{path} is not a `dino train` checkpoint (no student/iteration in it)")
    return state
