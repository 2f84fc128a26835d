"""Atomic checkpoint files: old file kept on failure, round trip, pruning, clear load errors."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from dino.atomic_files import atomic_write
from dino.errors import DinoError
from dino.training.checkpoint import LATEST, load_checkpoint, save_checkpoint


def state(iteration: int) -> dict:
    return {
        "student": {"w": torch.full((2, 3), float(iteration))},
        "teacher": {"w": torch.full((2, 3), -float(iteration))},
        "iteration": iteration,
        "config": {"model": {"arch": "vit_pico"}},
    }


def test_atomic_write_success(tmp_path) -> None:
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"hello"))
    assert path.read_bytes() == b"hello"
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize(
    "exc", [RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.EIO, "io")]
)
def test_atomic_write_failure_keeps_old_file(tmp_path, exc) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old content")

    def write(f) -> None:
        f.write(b"new partial")
        raise exc

    with pytest.raises(DinoError if isinstance(exc, OSError) else type(exc)):  # one line
        atomic_write(path, write)
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left


def test_atomic_write_disk_full_is_dino_error(tmp_path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def write(f) -> None:
        f.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DinoError, match="f.bin"):
        atomic_write(path, write)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_failure_without_old_file(tmp_path) -> None:
    path = tmp_path / "new.bin"
    with pytest.raises(ValueError):
        atomic_write(path, lambda f: (_ for _ in ()).throw(ValueError("x")))
    assert os.listdir(tmp_path) == []


def test_save_load_round_trip(tmp_path) -> None:
    latest = save_checkpoint(state(7), tmp_path)
    assert latest == tmp_path / LATEST
    for where in (latest, tmp_path):  # the file or its run folder
        loaded = load_checkpoint(where)
        assert loaded["iteration"] == 7
        assert loaded["config"] == {"model": {"arch": "vit_pico"}}
        torch.testing.assert_close(loaded["student"]["w"], torch.full((2, 3), 7.0))
        torch.testing.assert_close(loaded["teacher"]["w"], torch.full((2, 3), -7.0))
    assert sorted(os.listdir(tmp_path)) == [LATEST]


def test_save_overwrites_latest(tmp_path) -> None:
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    assert load_checkpoint(tmp_path)["iteration"] == 2


def test_keep_prunes_older_numbered_files(tmp_path) -> None:
    for it in range(1, 6):
        save_checkpoint(state(it * 10), tmp_path, keep=2)
    files = set(os.listdir(tmp_path))
    # the latest plus 2 older ones as numbered files, and checkpoint.pth = the latest
    assert files == {
        LATEST, "checkpoint-00000030.pth", "checkpoint-00000040.pth", "checkpoint-00000050.pth"
    }  # fmt: skip
    assert load_checkpoint(tmp_path)["iteration"] == 50
    assert load_checkpoint(tmp_path / "checkpoint-00000030.pth")["iteration"] == 30
    assert load_checkpoint(tmp_path / "checkpoint-00000040.pth")["iteration"] == 40


def test_keep_one(tmp_path) -> None:
    for it in (100, 200, 300):
        save_checkpoint(state(it), tmp_path, keep=1)
    numbered = sorted(p for p in os.listdir(tmp_path) if p != LATEST)
    assert numbered == ["checkpoint-00000200.pth", "checkpoint-00000300.pth"]


def test_load_truncated_file(tmp_path) -> None:
    path = save_checkpoint(state(3), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DinoError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_load_non_checkpoint_files(tmp_path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(DinoError) as info:
        load_checkpoint(text)
    assert str(text) in str(info.value)
    other = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, other)  # a torch file, but no student / iteration
    with pytest.raises(DinoError) as info:
        load_checkpoint(other)
    assert str(other) in str(info.value)


def test_load_missing(tmp_path) -> None:
    with pytest.raises(DinoError) as info:
        load_checkpoint(tmp_path)  # a folder without checkpoint.pth
    assert str(tmp_path / LATEST) in str(info.value)
