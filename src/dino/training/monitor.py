"""Collapse and divergence monitoring from the loss statistics (RECIPE.md).

* uniform collapse: the teacher output entropy approaches log K and the student/teacher KL 0;
* one dimension dominates: the entropy approaches 0 and the KL 0.
A learning run keeps a KL clearly above 0 and an entropy between the two.
"""

from __future__ import annotations

import math

from dino.config import Config
from dino.errors import DinoError

_FIXES = {
    "uniform": "the teacher output is uniform: lower --teacher-temp (sharpening), raise "
    "--momentum-teacher, or lower --lr",
    "dominant": "one output dimension dominates: check that centering is on "
    "(--center-momentum < 1), raise --teacher-temp slightly, or lower --lr",
}


class CollapseMonitor:
    """Watches a moving average of the entropy and KL; names a collapse mode when it sets in.

    Args:
        out_dim: K (the uniform entropy is log K).
        kl_eps: KL below which student and teacher agree trivially.
        window: iterations of the moving average.
    """

    def __init__(self, out_dim: int, kl_eps: float = 1e-3, window: int = 20) -> None:
        self.log_k = math.log(out_dim)
        self.kl_eps = kl_eps
        self.alpha = 1.0 / window
        self.entropy: float | None = None
        self.kl: float | None = None
        self.mode: str | None = None
        self.bad_streak = 0
        self.seen = 0

    def update(self, entropy: float, kl: float) -> str | None:
        """Feed one step; returns a warning the first time a collapse mode is detected."""
        self.seen += 1
        if self.entropy is None or self.kl is None:
            self.entropy, self.kl = entropy, kl
        else:
            self.entropy += self.alpha * (entropy - self.entropy)
            self.kl += self.alpha * (kl - self.kl)
        if self.seen < 10 or self.kl > self.kl_eps:
            return None
        mode = "uniform" if self.entropy > 0.5 * self.log_k else "dominant"
        if mode == self.mode:
            return None
        self.mode = mode
        return (
            f"collapse detected ({mode}): teacher entropy {self.entropy:.3f} (log K = "
            f"{self.log_k:.2f}), KL {self.kl:.2e}; {_FIXES[mode]}"
        )

    def good_step(self) -> None:
        self.bad_streak = 0

    def bad_step(self, iteration: int, cfg: Config, max_bad_steps: int = 20) -> None:
        self.bad_streak += 1
        if self.bad_streak >= max_bad_steps:
            raise DinoError(
                f"the loss was non-finite for {self.bad_streak} consecutive steps (last at "
                f"iteration {iteration}); lower --lr, use --precision fp32, or lower "
                "--teacher-temp, then resume from the last checkpoint"
            )
