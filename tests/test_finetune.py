"""``dino finetune``: the fine-tuning recipe's parts, learning on a tiny problem, resuming, the
classifier it writes (used by ``dino classify`` without a bank), and the inputs it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.commands import RANDOM_PICO, one_error_line, pico, run_cli
from helpers.two_classes import write_folder

from dino.eval.finetune import Classifier, layer_of, param_groups, schedule

VIEW = ["--eval-resize", "16", "--eval-crop", "16", "--num-workers", "0"]
TRAIN = [*VIEW, "--batch-size", "8", "--layer-decay", "1", "--lr", "0.004", "--drop-path", "0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("levels"), "levels", train=16, val=10)


@pytest.fixture(scope="module")
def tuned(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pico ViT fine-tuned from random initialization for 6 epochs on dim against bright noise."""
    out = tmp_path_factory.mktemp("ft") / "run"
    argv = ["finetune", *RANDOM_PICO, "--data", str(folder), "--output-dir", str(out),
            "--epochs", "6", *TRAIN]  # fmt: skip
    from dino.cli import main

    assert main(argv) == 0
    return out


def test_layer_decay_scales_each_block_and_spares_norms_from_weight_decay() -> None:
    model = Classifier(pico().requires_grad_(True), 3)
    depth = len(model.backbone.blocks)
    assert layer_of("backbone.pos_embed", depth) == 0
    assert layer_of("backbone.blocks.1.attn.qkv.weight", depth) == 2
    assert layer_of("head.weight", depth) == depth + 1
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["head.weight"])] == (1.0, 0.05)
    assert scale[id(named["backbone.blocks.0.attn.qkv.weight"])] == (0.5**depth, 0.05)
    assert scale[id(named["backbone.cls_token"])] == (0.5 ** (depth + 1), 0.0)
    assert scale[id(named["backbone.blocks.0.norm1.weight"])][1] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    assert schedule(1.0, 0.0, 0.1) == 0.0
    assert schedule(1.0, 0.05, 0.1) == pytest.approx(0.5)
    assert schedule(1.0, 0.1, 0.1) == pytest.approx(1.0)
    assert schedule(1.0, 0.55, 0.1) == pytest.approx(0.5)
    assert schedule(1.0, 1.0, 0.1) == pytest.approx(0.0)


def test_finetune_learns_the_levels_and_writes_a_classifier(tuned, folder, capsys) -> None:
    res = json.loads((tuned / "results.json").read_text())
    assert res["top1"] >= 75.0  # 20 images of 2 classes: chance is 50 %
    assert res["epochs_run"] == 6 and res["steps"] == 6 * 4
    assert res["history"][-1]["loss"] < res["history"][0]["loss"]
    out = tuned.parent / "pred.csv"
    code, stdout, _ = run_cli(["classify", "--weights", str(tuned / "classifier.pth"),
                               "--images", str(folder / "val"), "--output", str(out), *VIEW,
                               "--json"], capsys)  # fmt: skip
    assert code == 0
    summary = json.loads(stdout)
    assert summary["mode"] == "classifier" and summary["accuracy"] == pytest.approx(res["top1"])
    assert out.read_text().splitlines()[0] == "file,label,score,second,second_score"


def test_classifier_refuses_a_bank_and_images_of_another_kind(tuned, folder, capsys) -> None:
    rgb = write_folder(tuned.parent / "rgb", train=1, val=1, mode="RGB")
    big = write_folder(tuned.parent / "big", train=1, val=1, size=24)
    out = tuned.parent / "never.csv"
    weights = ["--weights", str(tuned / "classifier.pth"), "--output", str(out), *VIEW]
    cases = {
        "fine-tuned classifier": ["--bank", str(folder / "train"), "--images", str(folder / "val")],
        "3 channel(s)": ["--images", str(rgb / "val")],
        "24x24 images": ["--images", str(big / "val")],
    }
    for expected, argv in cases.items():
        code, _, err = run_cli(["classify", *weights, *argv], capsys)
        assert code == 2 and expected in one_error_line(err)
        assert not out.exists()
    code, _, _ = run_cli(["classify", *weights, "--images", str(rgb / "val"), "--any-size"], capsys)
    assert code == 0 and out.exists()


def test_resume_continues_where_the_run_stopped(folder, tmp_path, capsys) -> None:
    out = tmp_path / "ft"
    argv = ["finetune", *RANDOM_PICO, "--data", str(folder), "--output-dir", str(out), *TRAIN,
            "--epochs", "2", "--labels-per-class", "8"]  # fmt: skip
    assert run_cli(argv, capsys)[0] == 0
    first = torch.load(out / "checkpoint.pth", weights_only=True)
    code, _, err = run_cli(argv, capsys)  # an earlier fine-tuning is never overwritten
    assert code == 2 and "--resume" in one_error_line(err)
    assert run_cli([*argv, "--resume"], capsys)[0] == 0  # already done: evaluated again
    again = torch.load(out / "checkpoint.pth", weights_only=True)
    assert again["step"] == first["step"] == 2 * 2
    # a longer schedule is another setup: refused, not silently mixed
    code, _, err = run_cli([*argv[:-4], "--epochs", "3", "--labels-per-class", "8", "--resume"],
                           capsys)  # fmt: skip
    assert code == 2 and "another epochs" in one_error_line(err)


def test_resume_after_an_interruption_matches_an_uninterrupted_run(
    folder, tmp_path, capsys, monkeypatch
) -> None:
    import dino.eval.finetune as ft

    argv = ["finetune", *RANDOM_PICO, "--data", str(folder), *TRAIN, "--epochs", "3",
            "--labels-per-class", "4"]  # fmt: skip
    assert run_cli([*argv, "--output-dir", str(tmp_path / "whole")], capsys)[0] == 0
    calls, saved = [], ft.save_torch

    def save_then_stop(obj, path):
        saved(obj, path)
        if Path(path).name == ft.CHECKPOINT and obj["epoch"] == 2:
            calls.append(obj["epoch"])
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_torch", save_then_stop)
    part = str(tmp_path / "part")
    assert run_cli([*argv, "--output-dir", part], capsys)[0] == 130
    assert calls == [2] and not (tmp_path / "part" / "results.json").exists()
    monkeypatch.setattr(ft, "save_torch", saved)
    assert run_cli([*argv, "--output-dir", part, "--resume"], capsys)[0] == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    resumed = json.loads((tmp_path / "part" / "results.json").read_text())
    assert resumed["steps"] == whole["steps"] == 3 * 1
    assert resumed["history"][:2] == whole["history"][:2]
    assert resumed["top1"] == whole["top1"]


def test_finetune_refuses_more_labels_than_a_class_has(folder, tmp_path, capsys) -> None:
    out = tmp_path / "ft"
    argv = ["finetune", *RANDOM_PICO, "--data", str(folder), "--output-dir", str(out), *TRAIN,
            "--labels-per-class", "17"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "more than class" in one_error_line(err) and "16 images" in err
    assert not out.exists()
