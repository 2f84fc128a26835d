"""Unreadable images met during training: each is replaced by another image (see
:class:`~dino.data.datasets.ImageFiles`), warned about once, listed in ``bad_files.txt`` of the
run folder, and the run stops when more than ``--max-bad-fraction`` of the data is unreadable."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dino.atomic_files import atomic_write
from dino.errors import DinoError
from dino.training.distributed import Dist

log = logging.getLogger("dino")

FILE_NAME = "bad_files.txt"


class BadFiles:
    """The unreadable files of a run so far (``paths``, in the order they were met)."""

    def __init__(self, run_dir: Path, data: str, total: int, max_fraction: float, d: Dist) -> None:
        self.run_dir = run_dir
        self.data = data  # --data, for the advice
        self.total = total
        self.max_fraction = max_fraction
        self.d = d
        self.paths: list[str] = []

    def note(self, bad: list[tuple[str, str]]) -> None:
        """Record the unreadable files of a batch: one warning each, then (with one process;
        several merge theirs when saving) rewrite ``bad_files.txt`` and check the fraction."""
        known = set(self.paths)
        new = False
        for path, reason in bad:
            if path in known:
                continue
            known.add(path)
            self.paths.append(path)
            new = True
            log.warning("unreadable image replaced by another one: %s (%s)", path, reason)
        if new and self.d.world == 1:
            self.write()
            self.check_fraction()

    def merge(self) -> None:
        """Every process's unreadable files, on every process (a collective call)."""
        parts: list[Any] = [None] * self.d.world
        dist.all_gather_object(parts, self.paths)
        self.paths = list(dict.fromkeys(p for part in parts for p in part))

    def write(self) -> None:
        """``bad_files.txt`` (on the main process, when there are any)."""
        if self.d.main and self.paths:
            text = "".join(f"{p}\n" for p in self.paths)
            atomic_write(self.run_dir / FILE_NAME, lambda f: f.write(text.encode()))

    def check_fraction(self) -> None:
        """Stop the run when more than ``--max-bad-fraction`` of the images are unreadable."""
        n = len(self.paths)
        if n > self.max_fraction * self.total:
            raise DinoError(
                f"{n} of the {self.total} images are unreadable, more than --max-bad-fraction "
                f"{self.max_fraction:g}; they are listed in {self.run_dir / FILE_NAME}. Remove "
                f"or fix them (`dino check-data {self.data}` finds all of them at once), or "
                "raise --max-bad-fraction to train on the rest"
            )
