"""Stopping a run on SIGTERM / SIGINT: the signal asks the run to stop after the current step;
the trainer then writes a checkpoint and exits with code 128 + signal."""

from __future__ import annotations

import signal
from types import TracebackType
from typing import Any

import torch

from dino.training.distributed import Dist, max_over_ranks


class Interrupted(Exception):
    """Raised in the epoch loop when a stop was requested: the run saves and exits."""


class StopSignals:
    """While entered, SIGTERM and SIGINT set :attr:`signum` instead of ending the process
    (the previous handlers come back on exit)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, d: Dist, device: torch.device) -> None:
        self.d, self.device = d, device
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._old = {s: signal.signal(s, self.request) for s in self.SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def request(self, signum: int, _frame: Any = None) -> None:
        """Ask the run to save a checkpoint after the current step and exit with code
        128 + ``signum`` (the signal handler)."""
        self.signum = signum

    def requested(self) -> bool:
        """Whether a stop signal reached this process or, in a multi-process run, any other:
        all processes get the same answer, so they save and exit at the same iteration (a
        process alone in a collective would wait for the others forever)."""
        if self.d.world > 1:
            agreed = max_over_ranks(self.signum or 0, self.device)
            if agreed:
                self.signum = self.signum or agreed
        return self.signum is not None

    def check(self) -> None:
        """Raise :class:`Interrupted` when a stop was requested."""
        if self.requested():
            raise Interrupted

    def stopped_workers(self, exc: RuntimeError) -> bool:
        """Whether ``exc`` is the DataLoader reporting its workers ended by the stop signal
        (sent to the whole process group: a scheduler's preemption, ``timeout``, Ctrl-C)."""
        return self.signum is not None and "DataLoader worker" in str(exc)
