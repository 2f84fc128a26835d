"""Atomic checkpoint files: write to a temporary file, flush to disk, rename.

A kill at any moment leaves either the previous checkpoint or the new one, never a torn file.
``checkpoint.pth`` is always the latest; with ``keep > 0`` the previous ones stay as
``checkpoint-<iteration>.pth`` (hard links, no extra space for the latest).
"""

from __future__ import annotations

import errno
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dino.errors import DinoError

LATEST = "checkpoint.pth"
_NUMBERED = re.compile(r"checkpoint-(\d+)\.pth$")


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it over
    ``path``. On any failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DinoError(
                f"no space left on the disk to write {path}; the previous file was kept, free "
                "some space and resume"
            ) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_torch(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


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
    """Write ``state`` as the latest checkpoint of ``run_dir``; keep ``keep`` older ones."""
    run_dir = Path(run_dir)
    latest = run_dir / LATEST
    if keep <= 0:
        save_torch(state, latest)
        return latest
    numbered = run_dir / f"checkpoint-{int(state['iteration']):08d}.pth"
    save_torch(state, numbered)
    tmp = run_dir / f".{LATEST}.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.link(numbered, tmp)
    os.replace(tmp, latest)
    old = sorted(p for p in run_dir.iterdir() if _NUMBERED.match(p.name))
    for p in old[: -(keep + 1)]:
        p.unlink(missing_ok=True)
    return latest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with a clear error if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.exists():
        raise DinoError(f"no checkpoint at {path}; pass a run folder written by `dino train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated or foreign file
        raise DinoError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, dict) or "student" not in state or "iteration" not in state:
        raise DinoError(f"{path} is not a `dino train` checkpoint (no student/iteration in it)")
    return state
