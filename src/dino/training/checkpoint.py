"""Checkpoint files, written atomically (:mod:`dino.atomic_files`).

A kill at any moment leaves either the previous checkpoint or the new one, never a torn file.
``checkpoint.pth`` is always the latest; with ``keep > 0`` it is saved as
``checkpoint-<iteration>.pth`` and ``checkpoint.pth`` is a hard link to it (the same bytes are
stored once; where the file system has no hard links, a copy), and the ``keep`` previous
numbered ones stay. Every checkpoint carries a checksum (:func:`dino.atomic_files.save_torch`),
verified on every load. Loading a run folder whose ``checkpoint.pth`` is missing, unreadable or
damaged falls back to the newest intact numbered one, with a warning.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from dino.atomic_files import atomic_write, check_intact, save_torch, write_failure
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
    link_or_copy(numbered, latest)
    old = sorted(p for p in run_dir.iterdir() if NUMBERED.match(p.name))
    for p in old[: -(keep + 1)]:
        p.unlink(missing_ok=True)
    return latest


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` a hard link to ``source`` (replacing it atomically), or, where the file
    system has no hard links, an atomic copy."""
    tmp = target.with_name(f".{target.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise write_failure(target, exc) from None
        atomic_write(target, lambda f: _copy_into(source, f))
        return
    try:
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(target, exc) from None


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
        return _load_file(path / LATEST, map_location, hint=False)
    except DinoError as exc:
        if not numbered:
            raise
        first_error = str(exc).split("; ")[0]
    for p in numbered:
        try:
            state = _load_file(p, map_location, hint=False)
        except DinoError:
            continue
        log.warning("%s; loading %s instead", first_error, p)
        return state
    raise DinoError(
        f"{first_error}, and none of the numbered checkpoints of {path} is readable either; "
        "start the run again in a new folder"
    )


def _load_file(path: Path, map_location: str | torch.device, hint: bool = True) -> dict[str, Any]:
    """Load one checkpoint file; ``hint``: name the newest intact one in the error if it is
    damaged."""
    if not path.exists():
        raise DinoError(f"no checkpoint at {path}; pass a run folder written by `dino train`")
    check_intact(path, hint)
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
