"""Runs on a small dataset: the schedules keep their shape in steps (``--min-steps``), a run too
short to learn says so, and the built-in preset learns on a few thousand images of another kind
than Fashion-MNIST (generated shapes, ``tests/helpers/shapes.py``)."""

from __future__ import annotations

import json
import logging

import pytest
from helpers.shapes import write_shapes

from dino.cli import main
from dino.config_load import load_config
from dino.eval.api import knn_eval
from dino.models.weights import load_backbone
from dino.training.schedules import MIN_LEARNING_STEPS, stretch_to_min_steps


def test_min_steps_stretches_epochs_and_every_length_in_epochs() -> None:
    cfg = load_config("fashion-mnist", {"min_steps": 1000, "warmup_teacher_temp_epochs": 1})
    out, factor = stretch_to_min_steps(cfg, steps_per_epoch=31)  # 9 epochs: 279 steps
    assert out.optim.epochs == 33 and factor == pytest.approx(33 / 9)  # ceil(1000 / 31)
    assert out.optim.epochs * 31 >= 1000
    assert out.optim.warmup_epochs == pytest.approx(cfg.optim.warmup_epochs * factor)
    assert out.optim.freeze_last_layer == pytest.approx(cfg.optim.freeze_last_layer * factor)
    assert out.loss.warmup_teacher_temp_epochs == pytest.approx(factor)
    assert out.run.eval_every == round(cfg.run.eval_every * factor)
    assert cfg.optim.epochs == 9  # the caller's config is left as it was
    # the warm-up and the teacher-momentum ramp cover the same share of the run as before
    share = cfg.optim.warmup_epochs / cfg.optim.epochs
    assert out.optim.warmup_epochs / out.optim.epochs == pytest.approx(share)


def test_min_steps_leaves_long_runs_and_subset_trials_alone() -> None:
    cfg = load_config("fashion-mnist", {"min_steps": 1000})
    assert stretch_to_min_steps(cfg, 468)[0] is cfg  # Fashion-MNIST: 4212 steps
    trial = load_config("fashion-mnist", {"min_steps": 1000, "subset": 256})
    assert stretch_to_min_steps(trial, 2)[0] is trial
    off = load_config("fashion-mnist", {"min_steps": 0})
    assert stretch_to_min_steps(off, 2)[0] is off


def test_a_run_too_short_to_learn_says_so(tmp_path, caplog) -> None:
    root = write_shapes(tmp_path / "shapes", 20, 5)  # 200 images: 1 step per epoch at batch 128
    caplog.set_level(logging.WARNING, logger="dino")
    rc = main(["train", "--config", "fashion-mnist", "--data", str(root), "--epochs", "2",
               "--min-steps", "0", "--output-dir", str(tmp_path / "run"), "--eval-every", "0",
               "--arch", "vit_pico", "--depth", "1", "--tensorboard", "false"])  # fmt: skip
    assert rc == 0
    warned = [r.getMessage() for r in caplog.records if "optimizer steps" in r.getMessage()]
    assert len(warned) == 1
    assert "only 2 optimizer steps" in warned[0]
    assert f"--min-steps {MIN_LEARNING_STEPS}" in warned[0]


@pytest.mark.slow
def test_the_built_in_preset_learns_on_a_small_folder_of_shapes(tmp_path) -> None:
    """4 000 training images of 10 kinds of shapes, the way a user trains on a folder:
    `dino train --config fashion-mnist --data DIR`. Its 9 epochs are 279 steps; the preset's
    --min-steps lengthens the run, and the teacher's k-NN ends well above the same network at
    random initialization (before this, it ended below it)."""
    root = write_shapes(tmp_path / "shapes", 400, 100, seed=1)
    run = tmp_path / "run"
    rc = main(["train", "--config", "fashion-mnist", "--data", str(root), "--output-dir",
               str(run), "--eval-every", "0", "--tensorboard", "false"])  # fmt: skip
    assert rc == 0
    trained = json.loads((run / "results.json").read_text())["knn"]["20"]["top1"]
    random = load_backbone("random", like=run, seed=0)
    untrained = knn_eval(random, str(root), ks=[20], device="cpu")["knn"]["20"]["top1"]
    print(f"k-NN top-1 (k = 20): trained {trained:.2f} %, random initialization {untrained:.2f} %")
    assert trained > untrained + 10.0
