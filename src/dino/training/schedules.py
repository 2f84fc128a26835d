"""Per-iteration schedules (RECIPE.md, "Optimization"): one value per training iteration."""

from __future__ import annotations

import numpy as np


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
