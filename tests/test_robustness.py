"""Robust training: unreadable images, non-finite steps, collapse, a full disk.

Tiny in-process runs (a folder of 20x20 PNGs, ViT-pico of depth 2, CPU fp32) through the
``dino`` command line, plus unit tests of the pieces. The collapse tests train on the built-in
Fashion-MNIST (skipped when it is not installed).
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.faults import install_nan, poison
from PIL import Image
from test_resume import TINY, write_images

from dino.cli import main
from dino.config_load import load_config
from dino.data.check import check_folder
from dino.data.datasets import BadImage, load_image
from dino.data.fashion_mnist import FASHION_MNIST_DIRS
from dino.training.checkpoint import LATEST, load_checkpoint
from dino.training.monitor import CollapseMonitor
from dino.training.trainer import Trainer

# ---------------------------------------------------------------- a folder of awkward files


def png_bytes(width: int, height: int, depth: int, pixels: bytes) -> bytes:
    """A PNG file (color type 2, RGB) with the given header and raw rows, written by hand so
    that the header can lie."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(pixels))
        + chunk(b"IEND", b"")
    )


def write_awkward_images(root: Path) -> tuple[list[Path], list[Path]]:
    """Readable files in every mode training must convert, and unreadable files of every
    kind; returns (readable, unreadable)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB")
    good: dict[str, object] = {
        "cmyk.jpg": rgb.convert("CMYK"),
        "gray.png": rgb.convert("L"),
        "gray_alpha.png": rgb.convert("LA"),
        "bilevel.png": rgb.convert("1"),
        "palette.png": rgb.quantize(16),
        "rgba.png": rgb.convert("RGBA"),
        "gray16.png": Image.fromarray(
            rng.integers(0, 65536, (20, 20), dtype=np.uint16).astype(np.uint16)
        ),
    }
    for name, img in good.items():
        img.save(root / name)  # type: ignore[attr-defined]
    rgb.quantize(16).save(root / "palette_transparent.png", transparency=0)
    rgb.save(root / "png_named.jpg", format="PNG")  # wrong extension, decodable content
    rows16 = rng.integers(0, 65536, (20, 20, 3), dtype=np.uint16).astype(">u2")
    raw16 = b"".join(b"\x00" + rows16[y].tobytes() for y in range(20))
    (root / "rgb16.png").write_bytes(png_bytes(20, 20, 16, raw16))
    for i in range(39):
        pix = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pix).save(root / f"plain{i:02d}.png")

    png = (root / "plain00.png").read_bytes()
    jpg = (root / "cmyk.jpg").read_bytes()
    bad = {
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "zero_bytes.png": b"",
        "not_an_image.png": b"name,size\nshirt,3\n",
        "heic_named.jpg": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
        "absurd_header.png": png_bytes(100_000, 100_000, 8, b"\x00" * 64),
        "too_many_pixels.png": png_bytes(10_000, 10_000, 8, b"\x00" * 64),
    }
    for name, content in bad.items():
        (root / name).write_bytes(content)
    unreadable = sorted(root / name for name in bad)
    readable = sorted(p for p in root.iterdir() if p not in unreadable)
    return readable, unreadable


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("awkward") / "images"
    readable, unreadable = write_awkward_images(root)
    assert len(readable) + len(unreadable) == 56  # 7 batches of 8: every file is met
    return root, readable, unreadable


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    write_images(root, 8, 0)  # 16 images: 2 steps an epoch
    return root


def train(data: Path, run: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), *TINY, "--num-workers", "0", "--eval-every", "0",
                 "--output-dir", str(run), *extra])  # fmt: skip


def test_load_image_converts_every_mode_to_8bit_rgb(awkward) -> None:
    _, readable, _ = awkward
    for path in readable:
        img = load_image(path)
        assert img.mode == "RGB" and img.size == (20, 20), path
        assert np.asarray(img).dtype == np.uint8
    white16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    path = readable[0].parent.parent / "white16.png"
    white16.save(path)
    assert np.asarray(load_image(path)).min() == 255  # 16-bit is scaled, not clipped


def test_load_image_rejects_every_kind_of_bad_file(awkward) -> None:
    _, _, unreadable = awkward
    for path in unreadable:
        with pytest.raises(BadImage) as info:
            load_image(path)
        assert str(path) in str(info.value)
    reasons = {p.name: str(_reason(p)) for p in unreadable}
    assert "empty file" in reasons["zero_bytes.png"]
    assert "not an image" in reasons["not_an_image.png"]
    assert "absurd dimensions" in reasons["absurd_header.png"]
    assert "absurd dimensions" in reasons["too_many_pixels.png"]


def _reason(path: Path) -> str:
    try:
        load_image(path)
    except BadImage as exc:
        return str(exc)
    return ""


def test_training_replaces_and_lists_unreadable_files(awkward, tmp_path, caplog) -> None:
    root, _, unreadable = awkward
    run = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="dino")
    assert train(root, run, "--epochs", "1", "--num-workers", "1", "--max-bad-fraction",
                 "0.15") == 0  # fmt: skip
    listed = (run / "bad_files.txt").read_text().splitlines()
    assert sorted(listed) == [str(p) for p in unreadable]
    warnings = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warnings) == len(unreadable)  # one line each
    assert all(str(p) in " ".join(warnings) for p in unreadable)
    assert json.loads((run / "results.json").read_text())["bad_files"] == len(unreadable)
    assert sorted(load_checkpoint(run)["bad_files"]) == sorted(listed)


def test_too_many_unreadable_files_stop_the_run(awkward, tmp_path, capsys) -> None:
    root, _, unreadable = awkward
    run = tmp_path / "run"
    assert train(root, run, "--epochs", "1", "--max-bad-fraction", "0.04") == 2
    err = capsys.readouterr().err
    assert "dino: error:" in err and "unreadable" in err and "--max-bad-fraction" in err
    assert str(run / "bad_files.txt") in err and "dino check-data" in err
    listed = (run / "bad_files.txt").read_text().splitlines()
    assert len(listed) >= 3 and set(listed) <= {str(p) for p in unreadable}  # 3 > 4% of 56
    assert f"{len(listed)} of the 56 images are unreadable" in err


def test_check_data_command(awkward, tmp_path, capsys) -> None:
    root, readable, unreadable = awkward
    out = tmp_path / "unreadable.txt"
    assert main(["check-data", str(root), "--workers", "2", "--output", str(out)]) == 1
    printed = capsys.readouterr().out
    flagged = [line.split(": ")[1] for line in printed.splitlines() if line.startswith("unread")]
    assert flagged == [str(p) for p in unreadable]
    assert f"{len(readable)} readable, {len(unreadable)} unreadable" in printed
    assert "CMYK" in printed and "16-bit" in printed  # the conversions are summarized
    assert "png_named.jpg is PNG" in printed
    assert out.read_text().splitlines() == [str(p) for p in unreadable]
    report = check_folder(root, workers=1)
    assert [p for p, _ in report.bad] == [str(p) for p in unreadable]


def test_check_data_clean_folder(clean, capsys) -> None:
    assert main(["check-data", str(clean)]) == 0
    assert "16 readable, 0 unreadable" in capsys.readouterr().out


def test_check_data_missing_folder(tmp_path, capsys) -> None:
    assert main(["check-data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- non-finite steps


def all_finite(state: dict) -> bool:
    tensors = [*state["student"].values(), *state["teacher"].values()]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


@pytest.mark.parametrize(
    ("kind", "reason"), [("loss", "non-finite loss"), ("grad", "non-finite gradient")]
)
def test_a_non_finite_step_is_skipped_and_logged(kind, reason, clean, tmp_path, monkeypatch):
    install_nan(monkeypatch, {3}, kind)
    run = tmp_path / "run"
    assert train(clean, run, "--epochs", "3", "--save-every", "1", "--keep", "10") == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if "skipped" in r]
    assert skipped == [{"iteration": 3, "epoch": 1.5, "skipped": reason}]
    assert {r["iteration"] for r in rows if "loss" in r} == {0, 1, 2, 4, 5}
    saved = sorted(p.name for p in run.glob("checkpoint-*.pth"))
    assert "checkpoint-00000004.pth" not in saved  # no checkpoint right after a bad step
    assert "checkpoint-00000005.pth" in saved
    final = load_checkpoint(run)
    assert final["iteration"] == 6 and all_finite(final)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_skipped_step_changes_nothing(kind, clean, tmp_path) -> None:
    cfg = load_config(None, {
        "data": str(clean), "arch": "vit_pico", "depth": 2, "patch_size": 4, "global_size": 16,
        "local_size": 8, "local_crops": 2, "out_dim": 32, "head_hidden_dim": 32,
        "head_bottleneck_dim": 16, "batch_size": 8, "precision": "fp32", "device": "cpu",
        "num_workers": 0, "output_dir": str(tmp_path / "run"), "freeze_last_layer": 0,
    })  # fmt: skip
    trainer = Trainer(cfg)
    poison(trainer, {0}, kind)
    before = copy.deepcopy(trainer.state())
    views, _ = next(trainer.batches.epoch(0))
    out = trainer.step(views)
    assert out == {"skipped": "non-finite gradient" if kind == "grad" else "non-finite loss"}
    after = trainer.state()
    for net in ("student", "teacher"):
        assert all(torch.equal(before[net][k], after[net][k]) for k in before[net])
    assert torch.equal(before["dino_loss"]["center"], after["dino_loss"]["center"])
    assert after["optimizer"]["state"] == {} and trainer.learner.loss_fn._pending is None
    trainer.iteration = 1
    assert "loss" in trainer.step(views)  # the next step is a normal one
    assert not torch.equal(trainer.learner.loss_fn.center, before["dino_loss"]["center"])


def test_persistent_non_finite_loss_stops_the_run(clean, tmp_path, monkeypatch, capsys) -> None:
    install_nan(monkeypatch, range(2, 101))
    run = tmp_path / "run"
    assert train(clean, run, "--epochs", "3", "--max-bad-steps", "3") == 2
    err = capsys.readouterr().err
    assert "non-finite loss in 3 consecutive steps (the last at iteration 4)" in err
    assert "lower --lr" in err and f"--resume {run}" in err
    state = load_checkpoint(run)  # the last checkpoint (end of epoch 1) still loads
    assert state["iteration"] == 2 and all_finite(state)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "skipped" in r] == [2, 3, 4]


# ---------------------------------------------------------------- a full disk


def test_full_disk_keeps_the_previous_checkpoint(clean, tmp_path, monkeypatch, capsys) -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # the disk fills up after the checkpoint of iteration 2
        if isinstance(obj, dict) and obj.get("iteration", 0) >= 4:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    assert train(clean, run, "--epochs", "3", "--save-every", "1", "--keep", "0") == 2
    err = capsys.readouterr().err
    assert "no space left on the disk" in err and str(run / LATEST) in err
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(run)["iteration"] == 3
    assert not [p for p in os.listdir(run) if ".tmp-" in p]


# ---------------------------------------------------------------- collapse


def test_monitor_flags_each_mode_once() -> None:
    k, b = 256, 64
    uniform = CollapseMonitor(k, b)
    warnings = [uniform.update(math.log(k) - 1e-4, 0.001, math.log(k)) for _ in range(20)]
    flagged = [w for w in warnings if w]
    assert len(flagged) == 1 and "uniform" in flagged[0] and "--teacher-temp" in flagged[0]
    assert warnings.index(flagged[0]) == uniform.warmup - 1
    dominant = CollapseMonitor(k, b)
    flagged = [w for w in (dominant.update(0.1, 0.3, 0.2) for _ in range(20)) if w]
    assert len(flagged) == 1 and "dominant" in flagged[0] and "--center-momentum" in flagged[0]
    healthy = CollapseMonitor(k, b)
    assert not any(healthy.update(3.0, 0.2, 5.0) for _ in range(100))
    restored = CollapseMonitor(k, b)
    restored.load_state_dict(dominant.state_dict())
    assert restored.mode == "dominant" and restored.update(0.1, 0.3, 0.2) is None


FASHION = pytest.mark.skipif(
    not any((d / "train-images-idx3-ubyte.gz").exists() for d in FASHION_MNIST_DIRS),
    reason="Fashion-MNIST is not installed",
)
# 2000 images, batch 64: 31 steps an epoch
COLLAPSE_RUN = [
    "train", "--subset", "2000", "--batch-size", "64", "--arch", "vit_pico", "--depth", "2",
    "--patch-size", "7", "--global-size", "28", "--local-size", "14", "--local-crops", "2",
    "--out-dim", "256", "--head-hidden-dim", "128", "--epochs", "2", "--eval-every", "0",
    "--precision", "fp32", "--device", "cpu", "--num-workers", "0", "--log-every", "1",
    "--knn-k", "10", "--koleo-weight", "0",  # the preset's KoLeo delays a uniform collapse
]  # fmt: skip


@pytest.mark.slow
@FASHION
@pytest.mark.parametrize(
    ("flags", "mode"),
    [
        (["--teacher-temp", "1.0", "--warmup-teacher-temp", "1.0"], "uniform"),
        (["--center-momentum", "1.0"], "dominant"),
    ],
    ids=["no-sharpening", "no-centering"],
)
def test_collapsing_config_is_flagged_within_one_epoch(flags, mode, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    rc = main([*COLLAPSE_RUN, *flags, "--stop-on-collapse", "true", "--output-dir", str(run)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"collapse detected ({mode})" in err and "--stop-on-collapse" in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    flagged = [r for r in rows if "collapse" in r]
    assert len(flagged) == 1 and flagged[0]["collapse"] == mode
    assert flagged[0]["iteration"] < 31  # within the first epoch
    assert mode in flagged[0]["warning"]


@pytest.mark.slow
@FASHION
def test_normal_config_is_not_flagged(tmp_path) -> None:
    run = tmp_path / "run"
    assert main([*COLLAPSE_RUN, "--output-dir", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 62
    assert not [r for r in rows if "collapse" in r or "skipped" in r]
