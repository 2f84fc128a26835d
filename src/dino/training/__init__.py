"""DINO pretraining.

``train(cfg)`` runs a whole run (:mod:`~dino.training.trainer`); one optimization step is
:func:`~dino.training.step.train_step` of a :class:`~dino.training.learner.Learner` (networks,
optimizer, losses) with the step's :class:`~dino.training.schedules.StepValues`. The other
modules hold one concern each: :mod:`~.stopping` (SIGTERM / SIGINT),
:mod:`~dino.training.run_state` (checkpoint contents, save, resume), :mod:`~.checkpoint`
(checkpoint files), :mod:`~.batches` (augmented views of each step), :mod:`~.networks`
(student and teacher), :mod:`~.optim`, :mod:`~.schedules`, :mod:`~.metrics`
(``metrics.jsonl``, TensorBoard), :mod:`~.monitor` (collapse), :mod:`~.bad_files`,
:mod:`~.knn` (k-NN during training) and :mod:`~.distributed` (several processes).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Trainer", "train"]


def __getattr__(name: str) -> Any:
    # imported on first use: ``dino.training.distributed`` alone stays light
    if name in __all__:
        from dino.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'dino.training' has no attribute {name!r}")
