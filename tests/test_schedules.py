"""Per-iteration schedules (docs/recipe.md, "Optimization")."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dino.config_load import load_config
from dino.training.schedules import Schedules, cosine_schedule, linear_warmup_then_constant


def test_cosine_without_warmup() -> None:
    s = cosine_schedule(1.0, 0.1, 11)
    assert len(s) == 11
    assert s[0] == pytest.approx(1.0)
    assert s[-1] == pytest.approx(0.1)
    # halfway through the cosine: the midpoint of base and final
    assert s[5] == pytest.approx(0.55)
    # the cosine formula at every step: final + (base - final) * (1 + cos(pi t / (n - 1))) / 2
    t = np.arange(11)
    np.testing.assert_allclose(s, 0.1 + 0.45 * (1 + np.cos(np.pi * t / 10)))
    assert np.all(np.diff(s) < 0)  # monotone decreasing


def test_cosine_increasing_when_final_above_base() -> None:
    s = cosine_schedule(0.04, 0.4, 50)
    assert s[0] == pytest.approx(0.04)
    assert s[-1] == pytest.approx(0.4)
    assert np.all(np.diff(s) > 0)


def test_cosine_with_warmup() -> None:
    total, warm = 20, 5
    s = cosine_schedule(2.0, 0.0, total, warmup_iters=warm, warmup_start=0.5)
    assert len(s) == total
    # linear from warmup_start, reaching base right after the warm-up
    np.testing.assert_allclose(s[:warm], 0.5 + (2.0 - 0.5) * np.arange(warm) / warm)
    assert s[0] == pytest.approx(0.5)
    assert s[warm] == pytest.approx(2.0)
    assert s.max() == pytest.approx(2.0)
    assert np.all(np.diff(s[: warm + 1]) > 0)
    assert np.all(np.diff(s[warm:]) <= 0)
    assert s[-1] == pytest.approx(0.0)


def test_cosine_warmup_longer_than_total_is_clipped() -> None:
    """A warm-up as long as the run or longer is the whole run: the linear ramp from
    warmup_start toward base over the run's steps, no cosine."""
    s = cosine_schedule(1.0, 0.0, 4, warmup_iters=10, warmup_start=0.2)
    np.testing.assert_allclose(s, 0.2 + 0.8 * np.arange(4) / 4)
    np.testing.assert_array_equal(s, cosine_schedule(1.0, 0.0, 4, 4, warmup_start=0.2))
    # one step after the warm-up: that step is the final value
    np.testing.assert_allclose(cosine_schedule(1.0, 0.1, 4, warmup_iters=3), [0, 1 / 3, 2 / 3, 0.1])


def test_linear_warmup_then_constant() -> None:
    s = linear_warmup_then_constant(0.04, 0.07, 10, 4)
    assert len(s) == 10
    np.testing.assert_allclose(s[:4], [0.04, 0.05, 0.06, 0.07])
    np.testing.assert_allclose(s[4:], 0.07)


def test_linear_warmup_zero_is_constant() -> None:
    s = linear_warmup_then_constant(0.04, 0.07, 6, 0)
    np.testing.assert_allclose(s, np.full(6, 0.07))


def make_cfg(**overrides):
    base = {
        "epochs": 4,
        "lr": 0.0005,
        "min_lr": 1e-6,
        "warmup_epochs": 1,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "momentum_teacher": 0.996,
        "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.07,
        "warmup_teacher_temp_epochs": 2,
    }
    base.update(overrides)
    return load_config("default", base)


def test_schedules_build() -> None:
    cfg = make_cfg()
    spe, gb = 5, 1024
    sch = Schedules.build(cfg, steps_per_epoch=spe, global_batch=gb)
    total = 4 * spe
    for arr in (sch.lr, sch.wd, sch.momentum, sch.teacher_temp):
        assert len(arr) == total
    peak = 0.0005 * gb / 256
    warm = 1 * spe
    # lr: linear from 0, peak right after the warm-up, then cosine to min_lr
    assert sch.lr[0] == pytest.approx(0.0)
    np.testing.assert_allclose(sch.lr[:warm], peak * np.arange(warm) / warm)
    assert sch.lr[warm] == pytest.approx(peak)
    assert sch.lr.max() == pytest.approx(peak)
    assert sch.lr[-1] == pytest.approx(1e-6)
    assert np.all(np.diff(sch.lr[warm:]) < 0)
    # weight decay: cosine 0.04 -> 0.4
    assert sch.wd[0] == pytest.approx(0.04)
    assert sch.wd[-1] == pytest.approx(0.4)
    assert np.all(np.diff(sch.wd) > 0)
    # teacher momentum: cosine 0.996 -> 1
    assert sch.momentum[0] == pytest.approx(0.996)
    assert sch.momentum[-1] == pytest.approx(1.0)
    assert np.all(np.diff(sch.momentum) > 0)
    assert np.all(sch.momentum <= 1.0)
    # teacher temperature: linear warm-up over 2 * spe iterations, then constant
    tw = 2 * spe
    np.testing.assert_allclose(sch.teacher_temp[:tw], np.linspace(0.04, 0.07, tw))
    np.testing.assert_allclose(sch.teacher_temp[tw:], 0.07)


def test_schedules_lr_scales_with_global_batch() -> None:
    cfg = make_cfg(warmup_epochs=0)
    a = Schedules.build(cfg, 3, 256).lr
    b = Schedules.build(cfg, 3, 64).lr
    assert a[0] == pytest.approx(0.0005)
    assert b[0] == pytest.approx(0.0005 / 4)


def test_schedules_fractional_warmup_epochs() -> None:
    cfg = make_cfg(warmup_epochs=0.5, warmup_teacher_temp_epochs=0)
    sch = Schedules.build(cfg, steps_per_epoch=10, global_batch=256)
    assert sch.lr[5] == pytest.approx(0.0005)
    assert sch.lr[4] < 0.0005
    np.testing.assert_allclose(sch.teacher_temp, 0.07)


def test_schedules_recipe_defaults() -> None:
    """The dataclass defaults give the reference recipe: 10 warm-up epochs, tau_t 0.04."""
    cfg = load_config("default")
    sch = Schedules.build(cfg, steps_per_epoch=2, global_batch=512)
    assert len(sch.lr) == 100 * 2
    assert sch.lr[20] == pytest.approx(0.001)
    assert sch.lr[19] < 0.001
    np.testing.assert_allclose(sch.teacher_temp, 0.04)
    assert sch.momentum[0] == pytest.approx(0.996)
    assert not math.isnan(sch.lr.sum())
