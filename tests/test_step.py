"""The training step (:func:`dino.training.step.train_step`) on a tiny in-memory run."""

from __future__ import annotations

import pytest
import torch

from dino.config_load import load_config
from dino.data.fashion_mnist import FASHION_MNIST_DIRS
from dino.training.step import train_step
from dino.training.trainer import Trainer

pytestmark = pytest.mark.skipif(
    not any((d / "train-images-idx3-ubyte.gz").exists() for d in FASHION_MNIST_DIRS),
    reason="Fashion-MNIST is not installed",
)


def tiny_trainer(tmp_path, **overrides) -> Trainer:
    """ViT-pico on 64 Fashion-MNIST images, batch 16: 4 steps an epoch; no warm-up, so the
    learning rate is above 0 from the first step."""
    cfg = load_config(None, {
        "data": "fashion-mnist", "subset": 64, "batch_size": 16, "arch": "vit_pico",
        "depth": 1, "patch_size": 7, "global_size": 28, "local_size": 14, "local_crops": 2,
        "out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "warmup_epochs": 0,
        "epochs": 2, "precision": "fp32", "device": "cpu", "num_workers": 0,
        "output_dir": str(tmp_path / "run"), **overrides,
    })  # fmt: skip
    return Trainer(cfg)


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


def test_last_layer_is_frozen_during_the_first_epoch_only(tmp_path) -> None:
    """``freeze_last_layer: 1``: a step of epoch 0 updates every trainable parameter but the
    head's last layer (the reference drops its gradients); a step of epoch 1 updates it too."""
    trainer = tiny_trainer(tmp_path, freeze_last_layer=1)
    assert trainer.steps_per_epoch == 4 and trainer.cfg.optim.freeze_last_layer == 1
    views, _ = next(trainer.batches.epoch(0))
    last = {n for n in trainable(trainer) if n.startswith("head.last_layer.")}
    assert last  # the weight-normed layer's directions (its norm is frozen at 1)

    trainer.iteration = 3  # epoch 0.75
    before = trainable(trainer)
    assert "loss" in train_step(trainer, views)
    assert changed(before, trainable(trainer)) == set(before) - last

    trainer.iteration = 4  # epoch 1.0
    before = trainable(trainer)
    assert "loss" in train_step(trainer, views)
    assert last <= changed(before, trainable(trainer))


def test_no_freeze_updates_the_last_layer_from_the_first_step(tmp_path) -> None:
    trainer = tiny_trainer(tmp_path, freeze_last_layer=0)
    views, _ = next(trainer.batches.epoch(0))
    before = trainable(trainer)
    assert "loss" in train_step(trainer, views)
    assert changed(before, trainable(trainer)) == set(before)
