"""Per-iteration schedules (docs/recipe.md, "Optimization"): one value per training iteration of
the learning rate, weight decay, teacher momentum and teacher temperature."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import numpy as np

from dino.config import Config

log = logging.getLogger("dino")

#: Fewer optimizer steps than this rarely get DINO past its uniform start: the teacher's output
#: first spreads toward uniform and only then sharpens into features (on Fashion-MNIST with the
#: built-in preset the teacher entropy peaks near log K around step 200 and falls from about
#: step 500; docs/experiments.md, "Small datasets").
MIN_LEARNING_STEPS = 1000


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


@dataclass(frozen=True)
class StepValues:
    """The scheduled values of one training step (:func:`dino.training.step.train_step`)."""

    iteration: int
    lr: float
    weight_decay: float
    momentum: float  # of the teacher's EMA
    teacher_temp: float
    freeze_last_layer: bool  # the head's last layer gets no update in this step


@dataclass
class Schedules:
    """One value per iteration of every scheduled quantity."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_frozen: np.ndarray  # bool: the first --freeze-last-layer epochs

    def at(self, iteration: int) -> StepValues:
        """The values of step ``iteration``."""
        i = iteration
        return StepValues(
            i,
            float(self.lr[i]),
            float(self.wd[i]),
            float(self.momentum[i]),
            float(self.teacher_temp[i]),
            bool(self.last_layer_frozen[i]),
        )

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
            last_layer_frozen=np.arange(total) / steps_per_epoch < o.freeze_last_layer,
        )


#: The lengths in epochs that cannot exceed the run, ``(section, field)``.
WARMUPS = (
    ("optim", "warmup_epochs"),
    ("loss", "warmup_teacher_temp_epochs"),
    ("optim", "freeze_last_layer"),
)


def shorten_warmups(cfg: Config) -> Config:
    """``cfg`` itself when its warm-ups and last-layer freeze fit in ``--epochs``, else a copy
    where those longer than the run are cut to its length, with one warning naming the new
    values (a quick ``dino train --data DIR --epochs 1`` trial of a 100-epoch recipe runs)."""
    epochs = cfg.optim.epochs
    long = [(s, n) for s, n in WARMUPS if getattr(getattr(cfg, s), n) > epochs]
    if not long:
        return cfg
    out = copy.deepcopy(cfg)
    for section, name in long:
        setattr(getattr(out, section), name, epochs)
    log.warning(
        "--epochs %d is shorter than %s: shortened to the run's %d epochs",
        epochs,
        ", ".join(f"--{n.replace('_', '-')} {getattr(getattr(cfg, s), n):g}" for s, n in long),
        epochs,
    )
    return out


def stretch_to_min_steps(cfg: Config, steps_per_epoch: int) -> tuple[Config, float]:
    """A run of ``cfg`` made at least ``--min-steps`` long: ``(cfg, 1.0)`` when it already is
    (or ``--min-steps`` is 0, or the run is a ``--subset`` trial), else a copy whose epochs rise
    to reach it, with every length counted in epochs (the learning-rate and teacher-temperature
    warm-ups, the last-layer freeze, the evaluation period) multiplied by the same factor, so
    that the schedules, the teacher-momentum ramp included, keep their shape in iterations; and
    that factor. A small dataset then trains as many steps as the preset was made for."""
    o = cfg.optim
    if not o.min_steps or cfg.data.subset or o.epochs * steps_per_epoch >= o.min_steps:
        return cfg, 1.0
    out = copy.deepcopy(cfg)
    epochs = math.ceil(o.min_steps / steps_per_epoch)
    factor = epochs / o.epochs
    out.optim.epochs = epochs
    out.optim.warmup_epochs = o.warmup_epochs * factor
    out.optim.freeze_last_layer = o.freeze_last_layer * factor
    out.loss.warmup_teacher_temp_epochs = cfg.loss.warmup_teacher_temp_epochs * factor
    if cfg.run.eval_every:
        out.run.eval_every = max(1, round(cfg.run.eval_every * factor))
    log.info(
        "%d steps per epoch x %d epochs = %d steps, fewer than --min-steps %d: training %d "
        "epochs (%d steps) with warm-ups, freeze and evaluation period in epochs x %.2f; pass "
        "--min-steps 0 to keep %d epochs",
        steps_per_epoch,
        o.epochs,
        o.epochs * steps_per_epoch,
        o.min_steps,
        epochs,
        epochs * steps_per_epoch,
        factor,
        o.epochs,
    )
    return out, factor


def warn_if_too_short(cfg: Config, steps_per_epoch: int, n_images: int, global_batch: int) -> None:
    """One warning when a run (not a ``--subset`` trial) has fewer than
    :data:`MIN_LEARNING_STEPS` steps, saying how to lengthen it."""
    total = cfg.optim.epochs * steps_per_epoch
    if cfg.data.subset or total >= MIN_LEARNING_STEPS:
        return
    epochs = math.ceil(MIN_LEARNING_STEPS / steps_per_epoch)
    log.warning(
        "this run makes only %d optimizer steps (%d images / global batch %d = %d steps per "
        "epoch, x %d epochs): DINO needs about %d to leave its uniform start and learn "
        "features, so expect features no better than the random network's. Pass --epochs %d "
        "or --min-steps %d (or a smaller --batch-size)",
        total,
        n_images,
        global_batch,
        steps_per_epoch,
        cfg.optim.epochs,
        MIN_LEARNING_STEPS,
        epochs,
        MIN_LEARNING_STEPS,
    )
