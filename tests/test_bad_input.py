"""Bad input never trains, never overwrites: every bad value of every ``dino`` command ends in
one ``dino: error:`` line and exit code 2, before data or weights are loaded, and writes nothing.

Each case calls :func:`dino.cli.main` in-process from an empty working folder and checks the
exit code, that stderr is exactly one ``dino: error:`` line (no traceback), that the line says
what the case expects (the field or flag, and the bad value), and that no file was created or
changed. The table in docs/robustness.md lists these families.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.faults import install_nan, install_stop_before_step
from PIL import Image

from dino.cli import main
from dino.config import leaf_fields
from dino.config_load import load_config
from dino.errors import DinoError
from dino.training.checkpoint import LATEST, load_checkpoint, save_checkpoint

# ---------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``root`` with its size and modification time, except the
    listing cache that reading an image folder may leave beside it (not an output)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if name.endswith(".dino-index.npz"):
                continue
            st = os.stat(p)
            # a folder: only that it exists (its mtime changes with that cache)
            out[p] = (0, 0) if os.path.isdir(p) else (st.st_size, st.st_mtime_ns)
    return out


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], root: Path) -> str:
    """Run ``dino argv``; assert exit 2, one ``dino: error:`` line, nothing written below
    ``root``; return the line."""
    before = snapshot(root)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("dino: error: "), err
    assert snapshot(root) == before, "a refused command wrote files"
    return lines[0]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder (default outputs such as ./features would land here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- config values (dino train)

#: (flags, words the message must hold: the field and the bad value / the valid range)
CONFIG_CASES = [
    (["--lr", "-0.001"], ["lr", "-0.001", "greater than 0"]),
    (["--lr", "0"], ["lr", "greater than 0"]),
    (["--lr", "nan"], ["lr", "finite", "nan"]),
    (["--lr", "inf"], ["lr", "finite", "inf"]),
    (["--lr", "fast"], ["lr", "a number", "fast"]),
    (["--min-lr", "-0.5"], ["min_lr", "at least 0", "-0.5"]),
    (["--batch-size", "0"], ["batch_size", "at least 1", "got 0"]),
    (["--batch-size", "-4"], ["batch_size", "-4"]),
    (["--epochs", "0"], ["epochs", "at least 1"]),
    (["--epochs", "2.5"], ["epochs", "an integer", "2.5"]),
    (["--patch-size", "0"], ["patch_size", "at least 1", "got 0"]),
    (["--patch-size", "-7"], ["patch_size", "-7"]),
    (["--patch-size", "5"], ["global_size", "patch_size=5"]),
    (["--global-size", "0"], ["global_size", "at least 1"]),
    (["--local-size", "-14"], ["local_size", "-14"]),
    (["--depth", "0"], ["depth", "at least 1"]),
    (["--out-dim", "1"], ["out_dim", "at least 2"]),
    (["--head-hidden-dim", "0"], ["head_hidden_dim", "at least 1"]),
    (["--head-bottleneck-dim", "0"], ["head_bottleneck_dim", "at least 1"]),
    (["--drop-path-rate", "1"], ["drop_path_rate", "[0, 1)"]),
    (["--drop-path-rate", "-0.1"], ["drop_path_rate", "-0.1"]),
    (["--local-crops", "-1"], ["local_crops", "at least 0"]),
    (["--global-scale", "0.5"], ["global_scale", "2 values", "got 1"]),
    (["--global-scale", "0.9", "0.4"], ["global_scale", "min <= max", "[0.9, 0.4]"]),
    (["--global-scale", "0", "1"], ["global_scale", "(0, 1]"]),
    (["--local-scale", "0.05", "1.5"], ["local_scale", "(0, 1]", "1.5"]),
    (["--blur-sigma", "0", "2"], ["blur_sigma", "greater than 0"]),
    (["--blur-sigma", "2", "0.1"], ["blur_sigma", "min <= max"]),
    (["--blur-p", "1", "0.5"], ["blur_p", "3 values", "got 2"]),
    (["--blur-p", "1", "0.1", "1.5"], ["blur_p", "[0, 1]", "1.5"]),
    (["--solarize-p", "0", "0.2"], ["solarize_p", "3 values"]),
    (["--solarize-p", "-0.1", "0", "0"], ["solarize_p", "[0, 1]"]),
    (["--mean", "0.5", "0.5"], ["mean", "3 values", "got 2"]),
    (["--mean", "0.5", "0.5", "0.5", "0.5"], ["mean", "3 values", "got 4"]),
    (["--mean", "128", "128", "128"], ["mean", "[0, 1]", "128"]),
    (["--std", "0.2", "0.2"], ["std", "3 values"]),
    (["--std", "0.2", "0", "0.2"], ["std", "greater than 0", "0.0"]),
    (["--std", "-0.2", "0.2", "0.2"], ["std", "-0.2"]),
    (["--brightness", "-0.4"], ["brightness", "at least 0"]),
    (["--contrast", "-1"], ["contrast", "at least 0"]),
    (["--saturation", "-0.2"], ["saturation", "at least 0"]),
    (["--hue", "0.6"], ["hue", "[0, 0.5]", "0.6"]),
    (["--color-jitter-p", "1.5"], ["color_jitter_p", "[0, 1]"]),
    (["--grayscale-p", "-0.2"], ["grayscale_p", "[0, 1]"]),
    (["--eval-resize", "0"], ["eval_resize", "at least 1"]),
    (["--eval-crop", "0"], ["eval_crop", "at least 1"]),
    (["--eval-crop", "300"], ["eval_crop=300", "eval_resize=28"]),
    (["--augment", "gpu"], ["augment", "auto, pil, tensor", "'gpu'"]),
    (["--num-workers", "-2"], ["num_workers", "at least -1"]),
    (["--subset", "-5"], ["subset", "at least 0", "-5"]),
    (["--max-bad-fraction", "2"], ["max_bad_fraction", "[0, 1]"]),
    (["--student-temp", "0"], ["student_temp", "greater than 0"]),
    (["--teacher-temp", "0"], ["teacher_temp", "greater than 0"]),
    (["--teacher-temp", "-0.04"], ["teacher_temp", "-0.04"]),
    (["--warmup-teacher-temp", "0"], ["warmup_teacher_temp", "greater than 0"]),
    (["--warmup-teacher-temp-epochs", "-1"], ["warmup_teacher_temp_epochs", "at least 0"]),
    (["--center-momentum", "1.5"], ["center_momentum", "[0, 1]", "1.5"]),
    (["--center-momentum", "-0.1"], ["center_momentum", "-0.1"]),
    (["--momentum-teacher", "1.01"], ["momentum_teacher", "[0, 1]", "1.01"]),
    (["--momentum-teacher", "-1"], ["momentum_teacher", "-1"]),
    (["--warmup-epochs", "-1"], ["warmup_epochs", "at least 0"]),
    (["--weight-decay", "-0.04"], ["weight_decay", "at least 0"]),
    (["--weight-decay-end", "-1"], ["weight_decay_end", "at least 0"]),
    (["--clip-grad", "-3"], ["clip_grad", "at least 0"]),
    (["--freeze-last-layer", "-1"], ["freeze_last_layer", "at least 0"]),
    (["--optimizer", "adam"], ["optimizer", "auto, adamw, sgd", "'adam'"]),
    (["--accumulate", "0"], ["accumulate", "at least 1", "0"]),
    (["--accumulate", "2", "--ibot-weight", "1"], ["accumulate=2", "iBOT", "--accumulate 1"]),
    (["--arch", "tv:resnet18", "--checkpoint-activations"], ["timm backbone", "tv:resnet18"]),
    (["--seed", "-1"], ["seed", "-1"]),
    (["--device", "gpu"], ["device", "cuda:N", "'gpu'"]),
    (["--precision", "fp8"], ["precision", "fp32", "'fp8'"]),
    (["--eval-every", "-1"], ["eval_every", "at least 0"]),
    (["--knn-k", "0", "20"], ["knn_k", "at least 1", "[0, 20]"]),
    (["--knn-temp", "0"], ["knn_temp", "greater than 0"]),
    (["--log-every", "0"], ["log_every", "at least 1"]),
    (["--save-every", "-10"], ["save_every", "at least 0"]),
    (["--keep", "-1"], ["keep", "at least 0"]),
    (["--max-bad-steps", "0"], ["max_bad_steps", "at least 1"]),
    (["--norm-last-layer", "maybe"], ["norm_last_layer", "true or false", "maybe"]),
    (["--arch", ""], ["arch", "empty"]),
    (["--init", "timm:"], ["timm:", "model name"]),
]


@pytest.mark.parametrize(
    ("flags", "words"), CONFIG_CASES, ids=[" ".join(f) or "empty" for f, _ in CONFIG_CASES]
)
def test_train_refuses_a_bad_setting(flags, words, work, capsys) -> None:
    line = refused(["train", *flags, "--output-dir", str(work / "run")], capsys, work)
    for word in words:
        assert word in line
    assert not (work / "run").exists()


def _bad_values(name: str) -> list[object]:
    """Values just outside what config field ``name`` declares valid: each bound crossed by one
    step, a list one value too short and one too long, an unknown choice."""
    _section, f, typ = leaf_fields()[name]
    meta = f.metadata
    step = 1 if int in (typ, *typing.get_args(typ)) else 0.5
    r = meta.get("range")
    out: list[object] = []
    if r is not None and not math.isinf(r.lo):
        out.append(r.lo if r.lo_open else r.lo - step)
    if r is not None and not math.isinf(r.hi):
        out.append(r.hi if r.hi_open else r.hi + step)
    if "length" in meta:
        lo, hi = meta["length"]
        inside = r.hi if r is not None and not math.isinf(r.hi) else (r.lo + step if r else 1)
        out = [[v] * lo for v in out]
        if lo > 1:
            out.append([inside] * (lo - 1))
        if not math.isinf(hi):
            out.append([inside] * (int(hi) + 1))
    if "choices" in meta:
        out.append("no-such-choice")
    return out


RANGED = [
    (name, bad)
    for name, (_s, f, _t) in leaf_fields().items()
    if {"range", "length", "choices"} & set(f.metadata)
    for bad in _bad_values(name)
]


@pytest.mark.parametrize(("name", "bad"), RANGED, ids=[f"{n}={b}" for n, b in RANGED])
def test_every_declared_range_is_enforced(name, bad) -> None:
    """Every config field with declared valid values refuses a value just outside them, with
    a message naming the field (this follows new fields automatically)."""
    with pytest.raises(DinoError, match=name):
        load_config("fashion-mnist", {name: bad})


def test_the_explicit_cases_name_real_fields() -> None:
    """Every command-line case above sets a field the config has (none went stale)."""
    covered = {f[0].removeprefix("--").replace("-", "_") for f, _ in CONFIG_CASES}
    assert covered <= set(leaf_fields())


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("lr: -1\n", ["lr", "greater than 0", "-1"]),
        ("teacher_temp: 0\n", ["teacher_temp", "greater than 0"]),
        ("mean: [0.5, 0.5]\n", ["mean", "3 values"]),
        ("epochs: true\n", ["epochs", "an integer", "True"]),
        ("batch_size: [64]\n", ["batch_size", "an integer"]),
        ("init:\n", ["init", "no value"]),
        ("arch: vit_pico\nno_such_field: 1\n", ["no_such_field", "unknown config field"]),
        ("- lr\n", ["mapping"]),
        ("epochs: [1,\n", ["not valid YAML", "line 2"]),
    ],
)
def test_train_refuses_a_bad_config_file(text, words, work, capsys) -> None:
    path = work / "mine.yaml"
    path.write_text(text)
    line = refused(
        ["train", "--config", str(path), "--output-dir", str(work / "run")], capsys, work
    )
    for word in words:
        assert word in line


# ---------------------------------------------------------------- data and paths (dino train)


def _png(path: Path, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def test_train_suggests_the_builtin_dataset(work, capsys) -> None:
    line = refused(["train", "--data", "fashion_mnist", "--output-dir", "run"], capsys, work)
    assert "fashion_mnist does not exist" in line and "--data fashion-mnist" in line


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("missing", ["does not exist"]),
        ("empty", ["no image files"]),
        ("text-only", ["no image files"]),
        ("file", ["not a folder"]),
    ],
)
def test_train_refuses_a_data_folder_without_images(setup, words, work, capsys) -> None:
    data = work / "data"
    if setup == "empty":
        data.mkdir()
    elif setup == "text-only":
        data.mkdir()
        (data / "notes.txt").write_text("no images here")
    elif setup == "file":
        data.write_text("not a folder")
    line = refused(
        [
            "train",
            "--data",
            str(data),
            "--config",
            "fashion-mnist",
            "--output-dir",
            str(work / "r"),
        ],
        capsys,
        work,
    )
    for word in words:
        assert word in line
    assert not (work / "r").exists()


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--config", "no-such-preset"], ["no-such-preset", "presets:"]),
        (["--nproc", "0"], ["--nproc", "at least 1"]),
        (["--output-dir", "taken.txt"], ["--output-dir", "existing file"]),
        (["--output-dir", "taken.txt/run"], ["cannot be created", "is a file"]),
        (["--resume", "no-such-run"], ["no-such-run"]),
    ],
)
def test_train_refuses_a_bad_path(flags, words, work, capsys) -> None:
    (work / "taken.txt").write_text("keep me")
    line = refused(["train", *flags], capsys, work)
    for word in words:
        assert word in line
    assert (work / "taken.txt").read_text() == "keep me"


# ---------------------------------------------------------------- usage mistakes (argparse)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["knn", "--weights", "x", "--k", "abc"], ["argument --k: invalid int value: 'abc'"]),
        (["train", "--nproc", "two"], ["argument --nproc: invalid int value"]),
        (["knn"], ["the following arguments are required: --weights", "dino knn --help"]),
        (["train", "--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
        (["knn", "--weights", "x", "--mean", "0.5"], ["argument --mean: expected 3 arguments"]),
        ([], ["the following arguments are required: command"]),
    ],
)
def test_usage_mistakes_are_one_line(argv, words, work, capsys) -> None:
    """Mistakes argparse catches also end in one ``dino: error:`` line (and exit code 2)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == 2 and len(lines) == 1 and lines[0].startswith("dino: error: ")
    for word in words:
        assert word in lines[0]
    assert not any(work.iterdir())


# ---------------------------------------------------------------- evaluation commands' flags

W = ["--weights", "no-such-weights.pth"]  # never loaded: the flags are checked first

EVAL_CASES = [
    (["knn", *W, "--k", "0"], ["--k", "at least 1", "[0]"]),
    (["knn", *W, "--k", "10", "-5"], ["--k", "[10, -5]"]),
    (["knn", *W, "--temperature", "0"], ["--temperature", "greater than 0"]),
    (["knn", *W, "--temperature", "-1"], ["--temperature", "-1"]),
    (["knn", *W, "--temperature", "nan"], ["--temperature", "finite"]),
    (["knn", *W, "--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["knn", *W, "--num-workers", "-3"], ["--num-workers", "at least -1"]),
    (["knn", *W, "--subset", "-1"], ["--subset", "at least 0"]),
    (["knn", *W, "--eval-resize", "0"], ["--eval-resize", "[1, 8192]"]),
    (["knn", *W, "--eval-crop", "0"], ["--eval-crop", "[1, 8192]"]),
    (["knn", *W, "--eval-crop", "100000"], ["--eval-crop", "100000"]),
    (["knn", *W, "--std", "0.2", "0", "0.2"], ["--std", "greater than 0"]),
    (["knn", *W, "--mean", "2", "2", "2"], ["--mean", "[0, 1]"]),
    (["knn", *W, "--patch-size", "0"], ["--patch-size", "at least 1"]),
    (["knn", *W, "--device", "tpu"], ["--device", "'tpu'"]),
    (["knn", *W, "--output", "folder"], ["--output", "is a folder"]),
    (["knn", *W, "--output", "taken.txt/knn.json"], ["--output", "cannot be created"]),
    (["extract", *W, "--data", "x", "--output", "taken.txt"], ["--output", "existing file"]),
    (["extract", *W, "--data", "x", "--batch-size", "-1"], ["--batch-size", "-1"]),
    (["linear", *W, "--epochs", "0"], ["--epochs", "at least 1"]),
    (["linear", *W, "--lr", "0"], ["--lr", "greater than 0"]),
    (["linear", *W, "--n-last-blocks", "0"], ["--n-last-blocks", "at least 1"]),
    (["linear", *W, "--val-every", "0"], ["--val-every", "at least 1"]),
    (["linear", *W, "--seed", "-1"], ["--seed", "-1"]),
    (["linear", *W, "--output-dir", "taken.txt"], ["--output-dir", "existing file"]),
    (["attention", "img.png", *W, "--threshold", "0"], ["--threshold", "(0, 1]"]),
    (["attention", "img.png", *W, "--threshold", "1.5"], ["--threshold", "1.5"]),
    (["attention", "img.png", *W, "--image-size", "-1"], ["--image-size", "[0, 8192]"]),
    (["attention", "img.png", *W, "--image-size", "100000"], ["--image-size", "100000"]),
    (["attention", "img.png", *W, "--output", "taken.txt"], ["--output", "existing file"]),
    (["export", "no-such-weights.pth", "--output", "out", "--image-size", "0"], ["--image-size"]),
    (["export", "no-such-weights.pth", "--output", "taken.txt"], ["--output", "existing file"]),
    (["report", "no-such-run", "--images", "-1"], ["--images", "at least 0"]),
    (["report", "no-such-run", "--image-size", "0"], ["--image-size", "[1, 8192]"]),
    (["report", "no-such-run", "--output", "taken.txt"], ["--output", "existing file"]),
    (["check-data", "folder", "--workers", "-1"], ["--workers", "at least 0"]),
    (["check-data", "folder", "--output", "folder"], ["--output", "is a folder"]),
]


@pytest.mark.parametrize(
    ("argv", "words"), EVAL_CASES, ids=[" ".join(a[:1] + a[3:]) for a, _ in EVAL_CASES]
)
def test_evaluation_refuses_a_bad_flag(argv, words, work, capsys) -> None:
    (work / "taken.txt").write_text("keep me")
    (work / "folder").mkdir()
    _png(work / "folder" / "a.png")
    line = refused(argv, capsys, work)
    for word in words:
        assert word in line
    assert (work / "taken.txt").read_text() == "keep me"


# ---------------------------------------------------------------- weights and images

R = ["--weights", "random", "--arch", "vit_pico", "--patch-size", "8"]

WEIGHTS_AND_IMAGES = [
    (["knn", "--weights", "nothing.pth"], ["nothing.pth does not exist", "dino_vits16"]),
    (["knn", "--weights", "dino_vits99"], ["dino_vits99 does not exist"]),
    (["knn", "--weights", "empty.pth"], ["empty.pth is not a readable", "truncated"]),
    (["knn", "--weights", "text.pth"], ["text.pth is not a readable"]),
    (["knn", "--weights", "foreign.pth"], ["cannot tell the architecture", "--arch"]),
    (["knn", "--weights", "random"], ["--weights random needs an architecture"]),
    (["knn", "--weights", "text.pth", "--like", "run"], ["--like only applies"]),
    (["export", "nothing.pth", "--output", "out"], ["nothing.pth does not exist"]),
    (["attention", "bad.png", *R], ["cannot read the image bad.png", "not an image"]),
    (["attention", "missing.png", *R], ["image missing.png does not exist"]),
    (["attention", "noimg", *R], ["no image files in noimg"]),
    (["attention", "big.png", *R, "--image-size", "0"], ["patches of 8 px", "--image-size"]),
    (["extract", *R, "--data", "noimg", "--output", "out"], ["no image files found in noimg"]),
    (["knn", *R, "--data", "noimg"], ["no image files found in noimg"]),
    (["linear", *R, "--data", "noimg", "--output-dir", "out"], ["no image files found"]),
    (["knn", *R, "--data", "fashion_mnist"], ["did you mean", "--data fashion-mnist"]),
    (["report", "nothing-run"], ["nothing-run has no metrics.jsonl"]),
]


@pytest.mark.parametrize(
    ("argv", "words"), WEIGHTS_AND_IMAGES, ids=[" ".join(a[:2]) for a, _ in WEIGHTS_AND_IMAGES]
)
def test_bad_weights_and_images_are_refused(argv, words, work, capsys) -> None:
    """Missing, empty, truncated, foreign weights; unreadable, missing, oversized images;
    folders without images: one line each, and no output folder is created."""
    (work / "empty.pth").write_bytes(b"")
    (work / "text.pth").write_text("not a checkpoint")
    torch.save({"a": torch.zeros(3)}, work / "foreign.pth")
    (work / "bad.png").write_text("not a png")
    (work / "noimg").mkdir()
    (work / "noimg" / "notes.txt").write_text("no images")
    Image.new("RGB", (1200, 1200)).save(work / "big.png")  # 150 x 150 patches of 8 px
    line = refused(argv, capsys, work)
    for word in words:
        assert word in line
    assert not (work / "out").exists()


# ---------------------------------------------------------------- evaluation folders


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("missing", ["does not exist"]),
        ("empty", ["no image files"]),
        ("text-only", ["no image files", "1 files without an image extension"]),
    ],
)
def test_check_data_refuses_a_folder_without_images(setup, words, work, capsys) -> None:
    data = work / "data"
    if setup != "missing":
        data.mkdir()
    if setup == "text-only":
        (data / "notes.txt").write_text("no images here")
    line = refused(["check-data", str(data)], capsys, work)
    for word in words:
        assert word in line


def test_knn_refuses_more_neighbours_than_training_images(work, capsys, caplog) -> None:
    """k above the 6 training images: refused when no k fits, else left out with a warning
    (never answered by a smaller k under its name)."""
    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _png(work / "data" / split / c / f"{i}.png", 16)
    argv = ["knn", "--weights", "random", "--arch", "vit_pico", "--patch-size", "8",
            "--data", str(work / "data"), "--eval-resize", "16", "--eval-crop", "16",
            "--num-workers", "0", "--k"]  # fmt: skip
    line = refused([*argv, "7", "10"], capsys, work)
    assert "k=7, 10 asks for more neighbours than the 6 training images" in line
    assert "pass --k values up to 6" in line
    assert main([*argv, "2", "6", "7", "--output", "knn.json"]) == 0
    assert list(json.loads((work / "knn.json").read_text())["knn"]) == ["2", "6"]
    assert "k=7 exceed the 6 training images" in caplog.text and "reported: k=2, 6" in caplog.text


# ---------------------------------------------------------------- earlier runs (dino train)

ARTEFACTS = [
    "checkpoint.pth",
    "checkpoint-00000004.pth",
    "teacher_backbone.pth",
    "results.json",
    "config.yaml",
    "metrics.jsonl",
    "train.log",
    "bad_files.txt",
    "events.out.tfevents.1.host.2.0",
]


@pytest.mark.parametrize("name", ARTEFACTS)
def test_a_new_run_never_overwrites_an_earlier_one(name, work, capsys) -> None:
    """A folder holding any file a run writes is refused for a new run (it could be resumed)."""
    run = work / "run"
    run.mkdir()
    (run / name).write_text("keep me")
    line = refused(["train", "--output-dir", str(run), "--epochs", "1"], capsys, work)
    assert f"{run} already holds a run ({name})" in line
    assert f"dino train --resume {run}" in line and "another --output-dir" in line
    assert (run / name).read_text() == "keep me"


def _run_folder(work: Path, checkpoint: dict | None = None, **overrides: object) -> Path:
    """A run folder as `dino train --config fashion-mnist` starts it: its config.yaml, and a
    checkpoint file holding ``checkpoint`` (keys a real one has) if given."""
    run = work / "run"
    run.mkdir()
    cfg = load_config("fashion-mnist", {"output_dir": str(run), **overrides})
    cfg.save_yaml(run / "config.yaml")
    if checkpoint is not None:
        torch.save({"student": {}, "config": cfg.to_dict(), **checkpoint}, run / "checkpoint.pth")
    return run


#: (flags given with --resume, words of the message)
RESUME_CASES = [
    (["--batch-size", "64"], ["--batch-size 64 (128 in the run)", "drop --batch-size"]),
    (["--lr", "0.01"], ["--lr 0.01 (0.002 in the run)", "drop --lr", "--output-dir NEW"]),
    (["--epochs", "20"], ["--epochs 20 (9 in the run)", "would change the run"]),
    (["--seed", "1"], ["--seed 1", "drop --seed"]),
    (["--teacher-temp", "0.07"], ["--teacher-temp 0.07", "exactly"]),
    (["--global-scale", "0.5", "1"], ["--global-scale [0.5, 1.0]", "drop --global-scale"]),
    (["--data", "other"], ["--data other", "drop --data"]),
    (["--knn-k", "20"], ["--knn-k [20]", "drop --knn-k"]),
    (["--precision", "bf16"], ["--precision bf16", "drop --precision"]),
    (["--lr", "0.01", "--momentum-teacher", "0.999"], ["drop --lr --momentum-teacher"]),
    (["--arch", "vit_nano"], ["--arch vit_nano (vit_pico in the run)", "drop --arch"]),
    (["--depth", "4"], ["--depth 4 (3 in the run)", "cannot be used", "drop --depth"]),
    (["--out-dim", "2048"], ["--out-dim 2048", "drop --out-dim"]),
    (["--patch-size", "14"], ["--patch-size 14", "drop --patch-size"]),
    (["--optimizer", "sgd"], ["--optimizer sgd", "drop --optimizer"]),
    (["--init", "dino_vits16"], ["--init dino_vits16", "drop --init"]),
    (["--config", "fashion-mnist"], ["--config does not apply with --resume", "drop --config"]),
]


@pytest.mark.parametrize(
    ("flags", "words"), RESUME_CASES, ids=[" ".join(f) for f, _ in RESUME_CASES]
)
def test_resume_is_exact_or_refused(flags, words, work, capsys) -> None:
    """A flag that would change the run is refused in place, naming the flag to drop; one the
    checkpoint cannot take (architecture, optimizer) is refused even into a new folder."""
    run = _run_folder(work)
    line = refused(["train", "--resume", str(run), *flags], capsys, work)
    for word in words:
        assert word in line
    if "cannot be used" in line:  # not even into a new folder
        again = refused(
            ["train", "--resume", str(run), *flags, "--output-dir", str(work / "new")],
            capsys,
            work,
        )
        assert again == line


def test_resume_on_another_process_count_keeps_the_global_batch(work, capsys) -> None:
    """A checkpoint of 2 processes x 128 on 1 process: exact only with --batch-size 256."""
    run = _run_folder(work, {"iteration": 4, "world_size": 2})
    line = refused(["train", "--resume", str(run)], capsys, work)
    assert "global batch of 256 (2 process(es) x 128)" in line
    assert "pass --batch-size 256 to resume it exactly" in line and "--output-dir NEW" in line


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("missing", ["no-such-run", "is not a run folder"]),
        ("no-config", ["is not a run folder (no config.yaml)"]),
        ("older-checkpoint", ["is not the latest checkpoint", "checkpoint-00000004.pth"]),
        ("new-folder-taken", ["already holds a run (results.json)"]),
        ("new-folder-is-file", ["is an existing file"]),
    ],
)
def test_resume_refuses_a_bad_folder(setup, words, work, capsys) -> None:
    argv = ["train", "--resume", str(work / "run")]
    if setup == "missing":
        argv = ["train", "--resume", str(work / "no-such-run")]
    elif setup == "no-config":
        (work / "run").mkdir()
        (work / "run" / "checkpoint.pth").write_text("x")
    else:
        run = _run_folder(work)
        for it in (2, 4):
            (run / f"checkpoint-{it:08d}.pth").write_text("never loaded")
        if setup == "older-checkpoint":
            argv = ["train", "--resume", str(run / "checkpoint-00000002.pth")]
        elif setup == "new-folder-taken":
            (work / "new").mkdir()
            (work / "new" / "results.json").write_text("{}")
            argv += ["--lr", "0.01", "--output-dir", str(work / "new")]
        else:
            (work / "new").write_text("a file")
            argv += ["--output-dir", str(work / "new")]
    line = refused(argv, capsys, work)
    for word in words:
        assert word in line


# ---------------------------------------------------------------- checkpoint files


def test_keep_one_links_the_latest_and_falls_back_past_damage(tmp_path) -> None:
    """With --keep 1 checkpoint.pth is a hard link of the latest numbered checkpoint (stored
    once): damage to it is damage to both, found by the checksum, and loading falls back to the
    previous checkpoint."""
    for it in (2, 4):
        save_checkpoint(
            {"student": {"w": torch.full((3,), float(it))}, "iteration": it}, tmp_path, keep=1
        )
    latest, numbered = tmp_path / LATEST, tmp_path / "checkpoint-00000004.pth"
    assert os.path.samefile(latest, numbered) and os.stat(latest).st_nlink == 2
    with open(latest, "r+b") as f:  # one byte flipped in place
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    state = load_checkpoint(tmp_path)
    assert state["iteration"] == 2 and torch.equal(state["student"]["w"], torch.full((3,), 2.0))


# ---------------------------------------------------------------- runs that trained nothing


def _tiny_folder(root: Path, n: int = 8) -> Path:
    for c in ("a", "b"):
        for i in range(n):
            _png(root / c / f"{i}.png", 16)
    return root


TINY_RUN = ["--arch", "vit_pico", "--depth", "1", "--patch-size", "8", "--global-size", "16",
            "--local-size", "8", "--local-crops", "1", "--out-dim", "16", "--head-hidden-dim",
            "16", "--head-bottleneck-dim", "8", "--batch-size", "8", "--precision", "fp32",
            "--device", "cpu", "--num-workers", "0", "--warmup-epochs", "0", "--eval-every", "0",
            "--eval-resize", "16", "--eval-crop", "16", "--knn-k", "1", "--tensorboard", "false",
            "--blur-sigma", "0.1", "0.5"]  # fmt: skip


def test_a_run_whose_every_step_was_skipped_is_not_a_success(work, capsys, monkeypatch) -> None:
    """2 steps, both non-finite (fewer than --max-bad-steps): exit 2, no results.json, no
    checkpoint of a run that trained nothing."""
    install_nan(monkeypatch, range(100))
    data, run = _tiny_folder(work / "data"), work / "run"
    code = main(
        ["train", "--data", str(data), *TINY_RUN, "--epochs", "1", "--output-dir", str(run)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "all 2 steps of this run had a non-finite loss or gradient" in err
    assert "nothing was trained, so no results are written" in err
    assert not (run / "results.json").exists() and not (run / LATEST).exists()


# ---------------------------------------------------------------- slow: real runs


@pytest.mark.slow
def test_a_changed_resume_goes_to_a_new_folder_and_leaves_the_run(
    work, capsys, monkeypatch, caplog
) -> None:
    """Stopped after 1 of 4 steps; resumed in place with settings that change nothing of the
    result (--keep, --log-every, its images moved to another folder, but not other images);
    continued with --lr and --epochs into a new folder, which leaves the finished run byte for
    byte as it was; a finished run is not resumed again."""
    data, run, new = _tiny_folder(work / "data"), work / "run", work / "new"
    args = ["train", "--data", str(data), *TINY_RUN, "--epochs", "2", "--save-every", "1"]
    with monkeypatch.context() as m:
        install_stop_before_step(m, 1)
        with pytest.raises(SystemExit) as info:
            main([*args, "--output-dir", str(run)])
    assert info.value.code == 128 + signal.SIGTERM
    config = (run / "config.yaml").read_bytes()
    fewer = _tiny_folder(work / "fewer", n=4)  # another data set: refused in place
    capsys.readouterr()
    line = refused(["train", "--resume", str(run), "--data", str(fewer)], capsys, work)
    assert "holds 8 training images, the run in" in line and "trained on 16" in line
    shutil.copytree(data, work / "moved")  # the same images elsewhere: fine
    assert main(["train", "--resume", str(run), "--keep", "3", "--log-every", "2",
                 "--data", str(work / "moved")]) == 0  # fmt: skip
    assert (run / "config.yaml").read_bytes() == config  # written once, when the run started
    assert load_checkpoint(run)["iteration"] == 4
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()

    line = refused(["train", "--resume", str(run)], capsys, work)
    assert "is complete (4 iterations, 2 epochs" in line and "--output-dir NEW" in line
    line = refused(["train", "--resume", str(run), "--output-dir", str(new)], capsys, work)
    assert "--epochs 2 leaves nothing to train" in line

    assert main(["train", "--resume", str(run), "--epochs", "3", "--lr", "0.001",
                 "--output-dir", str(new)]) == 0  # fmt: skip
    assert "with changed settings (epochs 2 -> 3; lr 0.0005 -> 0.001)" in caplog.text
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    state = load_checkpoint(new)
    assert state["iteration"] == 6 and state["config"]["optim"]["lr"] == 0.001
    assert load_config(str(new / "config.yaml")).optim.epochs == 3


def _signal_run(sig: int, nproc: int, data: Path, run: Path) -> subprocess.CompletedProcess:
    """A folder run with 2 DataLoader workers per process, in its own process group; the
    signal goes to the whole group (as schedulers, `timeout` and Ctrl-C send it)."""
    argv = ["train", "--data", str(data), *TINY_RUN, "--num-workers", "2", "--epochs", "200",
            "--log-every", "1", "--output-dir", str(run), "--nproc", str(nproc)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dino", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not (run / LATEST).exists():  # a few epochs: workers started, a checkpoint saved
            assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
            time.sleep(0.05)
        time.sleep(1.0)
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_saves_and_exits(sig, nproc, work) -> None:
    data, run = _tiny_folder(work / "data"), work / "run"
    proc = _signal_run(sig, nproc, data, run)
    err = proc.stderr
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "exited unexpectedly" not in err, err[-3000:]
    assert f"--resume {run}" in err
    state = load_checkpoint(run)
    assert state["world_size"] == nproc
    done = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = 1 + max(r["iteration"] for r in done if "loss" in r)
    if nproc == 2 and "lost contact with the other processes" in err:
        # Seen once in CI (1 of several hundred runs, not reproduced): rank 0 found rank 1
        # gone inside a collective. The run still ends as a stop, and the checkpoint it keeps
        # is an intact earlier one, never a half-written one.
        assert state["iteration"] <= last, err[-3000:]
        return
    assert f"signal {int(sig)} received: saving a checkpoint" in err, err[-3000:]
    assert state["iteration"] == last
