"""Faults that tests inject into training runs, by monkeypatching the product's own functions:
non-finite losses and gradients, SIGKILL before a step or in the middle of writing a checkpoint,
the failure of one process of a multi-process run, a stop request.

Each ``install_*`` takes a :class:`pytest.MonkeyPatch` (the ``monkeypatch`` fixture in a test;
:mod:`train_with_faults` uses one in a subprocess) and undoes itself with it.
"""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Callable, Collection
from typing import Any

import pytest
import torch

import dino.training.checkpoint
from dino.atomic_files import atomic_write
from dino.devices import launch_env
from dino.training.trainer import Trainer


def _after_init(mp: pytest.MonkeyPatch, install: Callable[[Trainer], None]) -> None:
    """Call ``install(trainer)`` on every :class:`Trainer` built from now on."""
    real_init = Trainer.__init__

    def init(self: Trainer, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        install(self)

    mp.setattr(Trainer, "__init__", init)


def poison(trainer: Trainer, iterations: Collection[int], kind: str = "loss") -> None:
    """Make the loss (``kind="loss"``) or one gradient (``"grad"``) of ``trainer``'s steps at
    ``iterations`` NaN."""
    if kind == "loss":
        real_term = trainer.learner.loss_fn.student_term

        def student_term(*args: Any, **kwargs: Any) -> torch.Tensor:
            term = real_term(*args, **kwargs)
            return term * float("nan") if trainer.iteration in iterations else term

        trainer.learner.loss_fn.student_term = student_term
    elif kind == "grad":

        def nan_grad(p: torch.Tensor) -> None:
            if trainer.iteration in iterations:
                p.grad.fill_(float("nan"))

        trainer.learner.params[0].register_post_accumulate_grad_hook(nan_grad)
    else:
        raise ValueError(f"kind must be loss or grad, got {kind!r}")


def install_nan(mp: pytest.MonkeyPatch, iterations: Collection[int], kind: str = "loss") -> None:
    """:func:`poison` every trainer built from now on."""
    _after_init(mp, lambda trainer: poison(trainer, iterations, kind))


def _before_step(mp: pytest.MonkeyPatch, act: Callable[[Trainer], None]) -> None:
    """Call ``act(trainer)`` before every training step the trainer runs."""
    real_step = Trainer.step

    def step(t: Trainer, views: list[torch.Tensor]) -> dict[str, Any]:
        act(t)
        return real_step(t, views)

    mp.setattr(Trainer, "step", step)


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill_before_step(mp: pytest.MonkeyPatch, iteration: int) -> None:
    """SIGKILL the process when the step of ``iteration`` is about to run (after the step
    before it, its metrics line and any checkpoint of ``iteration``)."""
    _before_step(mp, lambda t: _sigkill() if t.iteration == iteration else None)


def install_stop_before_step(mp: pytest.MonkeyPatch, iteration: int) -> None:
    """Request a stop (as SIGTERM does) right after the step that makes the trainer's
    iteration ``iteration``: the run saves that iteration's checkpoint and exits."""
    real_step = Trainer.step

    def step(t: Trainer, views: list[torch.Tensor]) -> dict[str, Any]:
        out = real_step(t, views)
        if t.iteration + 1 == iteration:
            t.stop.request(signal.SIGTERM)
        return out

    mp.setattr(Trainer, "step", step)


def install_kill_while_saving(mp: pytest.MonkeyPatch, iteration: int) -> None:
    """SIGKILL the process in the middle of writing the checkpoint of ``iteration``: half of
    the file is written (and on disk) under its temporary name, the rename never happens."""
    real_save = dino.training.checkpoint.save_torch

    def save_torch(obj: Any, path: Any) -> None:
        if isinstance(obj, dict) and obj.get("iteration") == iteration:
            buf = io.BytesIO()
            torch.save(obj, buf)
            half = buf.getvalue()[: max(len(buf.getvalue()) // 2, 1)]

            def write_half_and_die(f: Any) -> None:
                f.write(half)
                f.flush()
                os.fsync(f.fileno())
                _sigkill()

            atomic_write(path, write_half_and_die)
        real_save(obj, path)

    mp.setattr(dino.training.checkpoint, "save_torch", save_torch)


def install_rank_failure(mp: pytest.MonkeyPatch, rank: int, iteration: int, mode: str) -> None:
    """Process ``rank`` of a multi-process run SIGKILLs itself (``mode="kill"``) or raises
    (``"raise"``) when it reaches ``iteration``."""

    def fail(t: Trainer) -> None:
        if launch_env().rank != rank or t.iteration != iteration:
            return
        if mode == "raise":
            raise RuntimeError(f"injected failure at iteration {iteration}")
        _sigkill()

    _before_step(mp, fail)
