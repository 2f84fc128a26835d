"""Collapse and divergence monitoring from the loss statistics (docs/recipe.md, "Loss,
centering and sharpening").

Two ways DINO collapses, both visible within the first epoch:

* uniform: the teacher output is uniform (its entropy reaches log K) and the student copies it
  (the student/teacher KL falls toward 0). Sharpening is too weak (teacher temperature too high).
* dominant: one output dimension (or a few) dominates every sample, so the teacher output
  averaged over the batch concentrates on a few dimensions: its entropy H falls, and with it
  the effective number of dimensions the batch uses, exp(H). Centering is off or too weak.

A learning run keeps a KL clearly above 0 and, thanks to centering, spreads a batch of B images
over about min(K, B) dimensions or more. The thresholds were checked on tiny Fashion-MNIST runs
(vit_pico, K = 256, batch 64, 31 steps an epoch): normal runs (teacher temperature 0.04 to 0.07,
the fashion-mnist preset) stay clear of them; ``--teacher-temp 1.0 --warmup-teacher-temp 1.0``
is flagged uniform at step 13, ``--center-momentum 1.0`` dominant at step 23
(tests/test_robustness.py keeps checking this).
"""

from __future__ import annotations

import math
from typing import Any

from dino.errors import DinoError

_FIXES = {
    "uniform": "the teacher output is uniform and the student copies it: lower --teacher-temp "
    "and --warmup-teacher-temp (sharpening, 0.04-0.07), raise --momentum-teacher, or lower --lr",
    "dominant": "a few output dimensions take every image (centering too weak): make sure "
    "centering is on (--center-momentum below 1, 0.9 by default), raise --teacher-temp "
    "slightly, or lower --lr",
}


class CollapseMonitor:
    """Watches moving averages of the loss statistics; names a collapse mode when it sets in.

    Args:
        out_dim: K (the uniform entropy is log K).
        batch_size: images per process and step (the batch entropy is measured over them).
        window: iterations of the exponential moving averages.
        warmup: steps seen before any verdict.
        uniform_entropy: uniform collapse needs the teacher entropy above this fraction of log K
        uniform_kl: ... and the student/teacher KL (nats) below this.
        dominant_dims: dominant collapse: the batch uses fewer than this fraction of
            min(K, batch_size) dimensions (exp of the batch entropy).
    """

    def __init__(
        self,
        out_dim: int,
        batch_size: int = 64,
        window: int = 4,
        warmup: int = 8,
        uniform_entropy: float = 0.99,
        uniform_kl: float = 0.03,
        dominant_dims: float = 0.25,
    ) -> None:
        self.log_k = math.log(out_dim)
        self.alpha = 1.0 / window
        self.warmup = warmup
        self.uniform_entropy = uniform_entropy
        self.uniform_kl = uniform_kl
        self.dominant_log_dims = math.log(max(dominant_dims * min(out_dim, batch_size), 1.0))
        self.entropy: float | None = None
        self.kl: float | None = None
        self.batch_entropy: float | None = None
        self.mode: str | None = None
        self.bad_streak = 0
        self.seen = 0

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)

    def update(self, entropy: float, kl: float, batch_entropy: float | None = None) -> str | None:
        """Feed one good step; returns a warning when a collapse mode is first detected (and
        again if the mode changes)."""
        self.seen += 1
        self.entropy = self._ema(self.entropy, entropy)
        self.kl = self._ema(self.kl, kl)
        if batch_entropy is not None:
            self.batch_entropy = self._ema(self.batch_entropy, batch_entropy)
        mode = self.detect()
        if mode is None or mode == self.mode:
            return None
        self.mode = mode
        spread = (
            f", the batch uses ~{math.exp(self.batch_entropy):.1f} dimensions"
            if self.batch_entropy is not None
            else ""
        )
        return (
            f"collapse detected ({mode}): teacher entropy {self.entropy:.3f}{spread} "
            f"(log K = {self.log_k:.2f}), KL {self.kl:.2e}; {_FIXES[mode]}"
        )

    def detect(self) -> str | None:
        """The collapse mode the moving averages show now, or None."""
        if self.seen < self.warmup or self.entropy is None or self.kl is None:
            return None
        if self.entropy > self.uniform_entropy * self.log_k and self.kl < self.uniform_kl:
            return "uniform"
        spread = self.batch_entropy if self.batch_entropy is not None else self.entropy
        if spread < self.dominant_log_dims:
            return "dominant"
        return None

    def good_step(self) -> None:
        self.bad_streak = 0

    def bad_step(self, iteration: int, reason: str, max_bad_steps: int, hint: str = "") -> None:
        """Count a skipped step; raise :class:`DinoError` after ``max_bad_steps`` in a row."""
        self.bad_streak += 1
        if self.bad_streak >= max_bad_steps:
            raise DinoError(
                f"{reason} in {self.bad_streak} consecutive steps (the last at iteration "
                f"{iteration}), so the run stopped; lower --lr, use --precision fp32, or lower "
                f"--teacher-temp{hint}"
            )

    def state_dict(self) -> dict[str, Any]:
        keys = ("entropy", "kl", "batch_entropy", "mode", "bad_streak", "seen")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
