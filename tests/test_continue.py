"""Continued pretraining (``dino train --init`` of a full checkpoint): the DINO head and the loss
center come along when they fit, ours and the reference's format; ``--new-head`` starts a new
head; the k-NN of the starting weights is logged beside every later evaluation."""

from __future__ import annotations

import argparse
import json
import logging

import torch
from helpers.two_classes import write_folder

import dino.training.learner as learner_module
from dino.cli import main
from dino.training.init_from import against_start

TINY_RUN = ["--arch", "vit_pico", "--depth", "1", "--patch-size", "8", "--global-size", "16",
            "--local-size", "8", "--local-crops", "1", "--out-dim", "16", "--head-hidden-dim",
            "16", "--head-bottleneck-dim", "8", "--batch-size", "8", "--precision", "fp32",
            "--device", "cpu", "--num-workers", "0", "--warmup-epochs", "0", "--eval-every", "1",
            "--eval-resize", "16", "--eval-crop", "16", "--knn-k", "3", "--tensorboard", "false",
            "--blur-sigma", "0.1", "0.5", "--epochs", "1"]  # fmt: skip


def reference_format(ckpt: dict) -> dict:
    """Our checkpoint rewritten as the reference code saves one: DDP student, old weight norm."""
    names = {"parametrizations.weight.original0": "weight_g",
             "parametrizations.weight.original1": "weight_v"}  # fmt: skip

    def rename(state: dict, prefix: str) -> dict:
        out = {}
        for k, v in state.items():
            for new, old in names.items():
                k = k.replace(new, old)
            out[prefix + k] = v
        return out

    return {
        "student": rename(ckpt["student"], "module."),
        "teacher": rename(ckpt["teacher"], ""),
        "dino_loss": {"center": ckpt["dino_loss"]["center"]},
        "args": argparse.Namespace(arch="vit_pico"),
        "epoch": 1,
    }


def test_init_loads_head_and_center_and_logs_the_starting_knn(tmp_path, monkeypatch) -> None:
    data = write_folder(tmp_path / "data", "levels", train=8, val=4)
    first = tmp_path / "first"
    assert main(["train", "--data", str(data), *TINY_RUN, "--output-dir", str(first)]) == 0
    ckpt = torch.load(first / "checkpoint.pth", weights_only=False)
    torch.save(reference_format(ckpt), tmp_path / "reference.pth")
    started = []
    real = learner_module.init_head_and_center

    def record(student, teacher, loss_fn, model):  # the networks as the run starts
        loaded = real(student, teacher, loss_fn, model)
        heads = {k: v.clone() for k, v in teacher.head.state_dict().items()}
        started.append((loaded, heads, loss_fn.center.clone()))
        return loaded

    monkeypatch.setattr(learner_module, "init_head_and_center", record)
    head = {k.removeprefix("head."): v for k, v in ckpt["teacher"].items() if "head." in k}
    for i, init in enumerate([str(first), str(tmp_path / "reference.pth")]):
        run = tmp_path / f"continued{i}"
        assert main(["train", "--data", str(data), *TINY_RUN, "--init", init,
                     "--output-dir", str(run)]) == 0  # fmt: skip
        loaded, state, center = started[-1]
        assert loaded and all(torch.equal(state[k], head[k]) for k in head)
        assert torch.equal(center, ckpt["dino_loss"]["center"])
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        start = [r for r in rows if r.get("iteration") == 0 and "knn_start" in r]
        later = [r for r in rows if "knn_top1_k20" in r and r.get("epoch", 0) > 0]
        assert len(start) == 1 and later
        assert later[-1]["knn_start"] == start[0]["knn_start"]
        assert later[-1]["knn_vs_start"] == later[-1]["knn_top1_k20"] - start[0]["knn_start"]
        results = json.loads((run / "results.json").read_text())
        assert results["knn_start"] == start[0]["knn"]
    run = tmp_path / "new-head"
    assert main(["train", "--data", str(data), *TINY_RUN, "--init", str(first), "--new-head",
                 "true", "--output-dir", str(run)]) == 0  # fmt: skip
    loaded, state, center = started[-1]
    assert not loaded and not torch.equal(state["mlp.0.weight"], head["mlp.0.weight"])
    assert not center.any()


def test_a_knn_below_the_starting_weights_is_warned_about(caplog) -> None:
    start = {"20": {"top1": 80.0, "top5": 99.0}}
    with caplog.at_level(logging.WARNING, logger="dino"):
        assert against_start({"20": {"top1": 81.0, "top5": 99.0}}, start)["knn_vs_start"] == 1.0
        assert not caplog.records
        fell = against_start({"20": {"top1": 75.5, "top5": 98.0}}, start)
    assert fell == {"knn_start": 80.0, "knn_vs_start": -4.5}
    assert "below the 80.00 of the --init weights" in caplog.text
