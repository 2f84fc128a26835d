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


def test_the_preset_on_a_folder_is_lengthened_to_min_steps_and_evaluated(tmp_path) -> None:
    """``dino train --config fashion-mnist --data DIR`` as a user runs it, on 200 shapes (1 step
    an epoch at the preset's batch of 128): --min-steps lengthens 2 epochs to 4, the saved
    config says so, every step is logged, and the teacher's k-NN on the folder's val split is
    written beside that of the same network at random initialization's, which the same
    evaluation gives. Whether the full run learns: ``benchmarks/learning.py --case shapes``."""
    root = write_shapes(tmp_path / "shapes", 20, 5, seed=1)
    run = tmp_path / "run"
    rc = main(["train", "--config", "fashion-mnist", "--data", str(root), "--output-dir",
               str(run), "--epochs", "2", "--min-steps", "4", "--eval-every", "0", "--depth", "1",
               "--log-every", "1", "--tensorboard", "false"])  # fmt: skip
    assert rc == 0
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.optim.epochs == 4 and cfg.optim.warmup_epochs == pytest.approx(0.3 * 2)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss" in r] == list(range(4))
    trained = json.loads((run / "results.json").read_text())["knn"]["20"]["top1"]
    teacher = load_backbone(run)
    assert knn_eval(teacher, str(root), ks=[20], device="cpu")["knn"]["20"]["top1"] == (
        pytest.approx(trained, abs=2.0)  # 1 of 50 queries: fp32 here, bf16 features in training
    )
    random = load_backbone("random", like=run, seed=0)
    assert (random.weights_info.arch, random.weights_info.depth) == ("vit_pico", 1)
    untrained = knn_eval(random, str(root), ks=[20], device="cpu")["knn"]["20"]["top1"]
    assert 0 <= untrained <= 100
