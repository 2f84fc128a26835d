"""Bad input never trains, never overwrites: every bad value of every ``dino`` command ends in
one ``dino: error:`` line and exit code 2, before data or weights are loaded, and writes nothing.

Each case calls :func:`dino.cli.main` in-process from an empty working folder and checks the
exit code, that stderr is exactly one ``dino: error:`` line (no traceback), that the line says
what the case expects (the field or flag, and the bad value), and that no file was created or
changed. The table in docs/robustness.md lists these families.
"""

from __future__ import annotations

import math
import os
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino.cli import main
from dino.config import leaf_fields, load_config
from dino.errors import DinoError

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
    (["--warmup-teacher-temp-epochs", "50"], ["warmup_teacher_temp_epochs=50", "epochs=9"]),
    (["--center-momentum", "1.5"], ["center_momentum", "[0, 1]", "1.5"]),
    (["--center-momentum", "-0.1"], ["center_momentum", "-0.1"]),
    (["--momentum-teacher", "1.01"], ["momentum_teacher", "[0, 1]", "1.01"]),
    (["--momentum-teacher", "-1"], ["momentum_teacher", "-1"]),
    (["--warmup-epochs", "-1"], ["warmup_epochs", "at least 0"]),
    (["--warmup-epochs", "20"], ["warmup_epochs=20", "epochs=9"]),
    (["--weight-decay", "-0.04"], ["weight_decay", "at least 0"]),
    (["--weight-decay-end", "-1"], ["weight_decay_end", "at least 0"]),
    (["--clip-grad", "-3"], ["clip_grad", "at least 0"]),
    (["--freeze-last-layer", "-1"], ["freeze_last_layer", "at least 0"]),
    (["--freeze-last-layer", "10"], ["freeze_last_layer=10", "epochs=9"]),
    (["--optimizer", "adam"], ["optimizer", "auto, adamw, sgd", "'adam'"]),
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


def test_knn_refuses_more_neighbours_than_training_images(work, capsys) -> None:
    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _png(work / "data" / split / c / f"{i}.png", 16)
    argv = ["knn", "--weights", "random", "--arch", "vit_pico", "--patch-size", "8",
            "--data", str(work / "data"), "--eval-resize", "16", "--eval-crop", "16",
            "--k", "2", "6", "7", "10", "--num-workers", "0"]  # fmt: skip
    line = refused(argv, capsys, work)
    assert "k=7, 10" in line and "6 training images" in line and "--k values up to 6" in line
