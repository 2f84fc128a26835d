"""Per-iteration schedules (docs/recipe.md, "Optimization"): one value per training iteration of
the learning rate, weight decay, teacher momentum and teacher temperature."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dino.config import Config


def cosine_schedule(
    base: float,
    final: float,
    total_iters: int,
    warmup_iters: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_iters``, then a cosine from
    ``base`` to ``final``; returns ``total_iters`` values (the last one equals ``final``)."""
    warmup_iters = min(warmup_iters, total_iters)
    warmup = np.linspace(warmup_start, base, warmup_iters, endpoint=False)
    n = total_iters - warmup_iters
    steps = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(n - 1, 1)))
    if n == 1:
        cosine = np.array([final])
    return np.concatenate([warmup, cosine])


def linear_warmup_then_constant(
    start: float, end: float, total_iters: int, warmup_iters: int
) -> np.ndarray:
    """Linear from ``start`` to ``end`` over ``warmup_iters``, then ``end`` (teacher temp)."""
    warmup_iters = min(warmup_iters, total_iters)
    return np.concatenate(
        [np.linspace(start, end, warmup_iters), np.full(total_iters - warmup_iters, end)]
    )


@dataclass
class Schedules:
    """One value per iteration of every scheduled quantity."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @classmethod
    def build(cls, cfg: Config, steps_per_epoch: int, global_batch: int) -> Schedules:
        o, lo = cfg.optim, cfg.loss
        total = o.epochs * steps_per_epoch
        peak = o.lr * global_batch / 256.0
        return cls(
            lr=cosine_schedule(peak, o.min_lr, total, round(o.warmup_epochs * steps_per_epoch)),
            wd=cosine_schedule(o.weight_decay, o.weight_decay_end, total),
            momentum=cosine_schedule(o.momentum_teacher, 1.0, total),
            teacher_temp=linear_warmup_then_constant(
                lo.warmup_teacher_temp,
                lo.teacher_temp,
                total,
                round(lo.warmup_teacher_temp_epochs * steps_per_epoch),
            ),
        )
