"""The run around the step (:class:`dino.training.trainer.Trainer`) from the command line:
a quick trial of the recipe on a folder, with the memory flags."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers.commands import run_cli

TINY = (
    "--arch vit_pico --patch-size 4 --global-size 16 --local-size 8 --local-crops 2 --out-dim 32 "
    "--head-hidden-dim 32 --head-bottleneck-dim 16 --eval-resize 16 --eval-crop 16 --device cpu "
    "--precision fp32 --num-workers 0 --min-steps 0"
).split()


@pytest.mark.slow  # a whole run through the folder pipeline
def test_a_one_epoch_trial_of_the_recipe_runs_with_shortened_warmups(
    tmp_path, capsys, caplog
) -> None:
    """``dino train --data DIR --epochs 1``: the recipe's 10 warm-up epochs are cut to the run
    (one warning naming them), and the run ends with its results; here with 2 accumulated
    batches of 4 and activation checkpointing."""
    rng = np.random.default_rng(0)
    data = tmp_path / "images"
    data.mkdir()
    for i in range(16):
        pix = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pix).save(data / f"{i:02d}.png")
    run = tmp_path / "run"
    flags = ["--batch-size", "4", "--accumulate", "2", "--checkpoint-activations"]
    argv = ["train", "--data", str(data), "--epochs", "1", *TINY, *flags, "--output-dir", str(run)]
    with caplog.at_level(logging.INFO, logger="dino"):
        code, _out, err = run_cli(argv, capsys)
    assert code == 0, err
    logged = caplog.text
    assert logged.count("--warmup-epochs 10") == 1 and "shortened to the run's 1 epochs" in logged
    assert "global batch 8" in logged  # 2 x 4 images per optimizer step: 2 steps of 16 images
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["warmup_epochs"] == 1 and saved["optim"]["accumulate"] == 2
    assert saved["run"]["checkpoint_activations"] is True
    assert json.loads((run / "results.json").read_text())["iterations"] == 2
