"""Nothing lost, whatever happens to the run folder (issue 35): one writer per run folder,
checksummed checkpoints, write failures and memory exhaustion as one line.

Tiny runs (ViT-pico of depth 2 on 16 made PNGs, CPU fp32) through the ``dino`` command line,
in this process or, for two writers at once, in two real processes.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.commands import one_error_line, run_cli
from test_resume import TINY, dino_env, write_images

from dino.atomic_files import MAGIC, TRAILER, save_torch, verify
from dino.cli import main
from dino.training import run_lock
from dino.training.checkpoint import LATEST, load_checkpoint, save_checkpoint

# 16 images, batch 8: 2 steps an epoch; 3 epochs = 6 steps, a checkpoint at every step
RUN = [*TINY, "--num-workers", "0", "--eval-every", "0", "--epochs", "3", "--save-every", "1",
       "--keep", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_images(root, 8, 0)
    return root


def train(images: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(images), *RUN, "--output-dir", str(run), *extra]


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory) -> Path:
    """A finished run, left untouched (tests copy it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(train(images, run)) == 0
    return run


def error_line(err: str) -> str:
    """The one ``dino: error:`` line of a run's stderr (which also holds its progress bars and
    log lines), with no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "dino: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("dino: error: "), err
    return lines[0]


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


# ---------------------------------------------------------------- one writer per run folder


def child_env() -> dict[str, str]:
    """The environment of a child process that imports the ``dino`` this test imports."""
    return {**dino_env(), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def start(images: Path, run: Path, *extra: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dino", *train(images, run, *extra)],
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder(images, tmp_path) -> None:
    """Two real processes on the same new --output-dir: one trains, the other exits 2 with one
    line naming the holder and writes nothing; the run equals a run made alone."""
    run = tmp_path / "run"
    procs = [start(images, run, cwd=tmp_path) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    line = one_error_line(err)
    assert ("is in use by process" in line and socket.gethostname() in line) or (
        "already holds a run" in line  # the other run had already written its files
    ), line
    alone = tmp_path / "alone"
    assert main(train(images, alone)) == 0
    a, b = load_checkpoint(alone), load_checkpoint(run)
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss" in r] == list(range(6))  # one run's lines


def test_a_second_writer_is_refused_naming_the_holder(images, finished, tmp_path, capsys):
    """While a process holds the lock of a run folder (here a child that took it), a resume of
    that run and a new run into it are refused, and nothing in the folder changes."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(run)], check=True)
    (run / "results.json").unlink()  # resumable: at its last checkpoint, results not written
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dino.training import run_lock; "
         "run_lock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(run)],
        env=child_env(),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        code, _, err = run_cli(["train", "--resume", str(run)], capsys)
        assert code == 2
        line = one_error_line(err)
        assert f"{run} is in use by process {holder.pid} on {socket.gethostname()}" in line
        assert "since 20" in line and "one run at a time" in line
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
        assert run_lock.holder(run)["pid"] == holder.pid
        code, out, _ = run_cli(["check-run", str(run)], capsys)
        assert f"lock: in use by process {holder.pid}" in out
    finally:
        holder.kill()
        holder.wait()
    # the OS released the killed holder's lock: the run resumes without any cleanup
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "results.json").exists()
    assert json.loads((run / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert run.resolve() not in run_lock.held_folders()  # released at the end of the run


# ---------------------------------------------------------------- checksums


def test_checksum_trailer_round_trip_and_plain_torch_load(tmp_path) -> None:
    path = tmp_path / "x.pth"
    obj = {"w": torch.arange(1000.0), "iteration": 3}
    save_torch(obj, path)
    data = path.read_bytes()
    assert data[-TRAILER:].startswith(MAGIC) and verify(path) is True
    assert torch.equal(torch.load(path, weights_only=True)["w"], obj["w"])  # still a torch file
    for offset in (len(data) // 2, 100, len(data) - 1):  # content, header, digest
        flip(path, offset)
        assert verify(path) is False
        flip(path, offset)
    torch.save(obj, tmp_path / "plain.pth")
    assert verify(tmp_path / "plain.pth") is None  # written by another program: not judged


def test_numbered_checkpoints_are_hard_links_of_the_latest(tmp_path) -> None:
    for it in (2, 4, 6):
        save_checkpoint({"student": {"w": torch.full((3,), float(it))}, "iteration": it},
                        tmp_path, keep=1)  # fmt: skip
    latest, numbered = tmp_path / LATEST, tmp_path / "checkpoint-00000006.pth"
    assert os.path.samefile(latest, numbered) and latest.stat().st_nlink == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-00000004.pth", "checkpoint-00000006.pth", LATEST
    ]  # fmt: skip


def test_a_flipped_byte_is_detected_on_every_load(finished, tmp_path, capsys, caplog) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(run)], check=True)
    latest = run / LATEST
    flip(latest, latest.stat().st_size // 2)  # checkpoint.pth and checkpoint-00000006.pth
    # a file by name: one line naming it and the newest intact checkpoint
    for argv in (
        ["knn", "--weights", str(latest), "--data", "fashion-mnist", "--subset", "20"],
        ["export", str(latest), "--output", str(tmp_path / "export")],
    ):
        code, _, err = run_cli(argv, capsys)
        line = one_error_line(err)
        assert code == 2 and f"{latest} is damaged" in line, line
        assert f"the newest intact one is {run / 'checkpoint-00000005.pth'}" in line
    # the run folder: falls back to the newest intact checkpoint, with a warning
    state = load_checkpoint(run)
    assert state["iteration"] == 5
    assert f"{latest} is damaged" in caplog.text
    assert "checkpoint-00000005.pth instead" in caplog.text
    code, out, _ = run_cli(["check-run", str(run)], capsys)
    assert code == 1
    assert "checkpoint.pth: DAMAGED" in out and "checkpoint-00000006.pth: DAMAGED" in out
    assert "checkpoint-00000005.pth: checksum ok" in out and "config.yaml: ok" in out
    assert f"newest intact checkpoint: {run / 'checkpoint-00000005.pth'}" in out
    assert run_cli(["check-run", str(finished)], capsys)[0] == 0


def test_training_init_verifies_the_checksum(images, finished, tmp_path, capsys) -> None:
    backbone = tmp_path / "teacher_backbone.pth"
    backbone.write_bytes((finished / "teacher_backbone.pth").read_bytes())
    flip(backbone, backbone.stat().st_size // 2)
    code, _, err = run_cli(train(images, tmp_path / "run", "--init", str(backbone)), capsys)
    assert code == 2 and f"{backbone} is damaged" in one_error_line(err)


# ---------------------------------------------------------------- write failures


@pytest.mark.parametrize(
    ("code", "why"),
    [
        (errno.ENOSPC, "no space left on the disk"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "the file system is read-only"),
        (errno.EDQUOT, "the disk quota is exceeded"),
    ],
)
def test_a_failed_checkpoint_write_is_one_line_and_resumes_exactly(
    code, why, images, finished, tmp_path, monkeypatch, capsys
) -> None:
    """The disk fails inside torch.save of the checkpoint of iteration 4: one line, the
    checkpoint of iteration 3 is kept, and the run resumes to the uninterrupted run's weights."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == 4:
            f.write(b"partial")
            raise OSError(code, os.strerror(code))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    rc, _, err = run_cli(train(images, run), capsys)
    line = error_line(err)
    assert rc == 2 and f"could not write {run / 'checkpoint-00000004.pth'}: {why}" in line
    assert "checkpoint.pth (the last checkpoint) is kept" in line
    assert f"then continue with `dino train --resume {run}`" in line
    assert load_checkpoint(run)["iteration"] == 3
    assert not [p for p in os.listdir(run) if ".tmp-" in p]
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--resume", str(run)]) == 0
    a, b = load_checkpoint(finished), load_checkpoint(run)
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])
    assert (finished / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    ("target", "after"),
    [
        ("metrics.jsonl", 0),
        ("results.json", 0),
        ("teacher_backbone.pth", 0),
        ("checkpoint.pth", 5000),  # the disk fills inside torch.save's own writer
        ("config.yaml", 10),
    ],
)
def test_every_run_file_write_failure_is_one_line(
    target, after, images, tmp_path, monkeypatch, capsys
) -> None:
    """The file ``target`` cannot be written past ``after`` bytes (the disk is full)."""
    import builtins

    import dino.atomic_files
    import dino.training.metrics

    real_open = builtins.open

    class Full:
        def __init__(self, f) -> None:
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data) if isinstance(data, str) else memoryview(data).nbytes
            if self.written > after:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        name = Path(path).name
        hit = name == target or name.startswith(f".{target}.tmp-")
        return Full(f) if hit and ("a" in str(args[:1]) or "w" in str(args[:1])) else f

    monkeypatch.setattr(dino.atomic_files, "open", full_open, raising=False)
    monkeypatch.setattr(dino.training.metrics, "open", full_open, raising=False)
    run = tmp_path / "run"
    rc, _, err = run_cli(train(images, run, "--epochs", "1", "--keep", "0"), capsys)
    line = error_line(err)
    assert rc == 2 and f"could not write {run / target}: no space left on the disk" in line
    if target != "config.yaml":  # (before it, the folder is not a run yet: start it again)
        assert f"continue with `dino train --resume {run}`" in line


def test_an_unexpected_os_error_in_any_command_is_one_line(tmp_path, monkeypatch, capsys):
    """A write outside the atomic helpers (here: inside the export) still ends in one line."""
    import dino.models.export

    target = tmp_path / "out" / "model.safetensors"

    def fail(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(dino.models.export, "export_backbone", fail)
    code, _, err = run_cli(["export", "random", "--arch", "vit_pico", "--output",
                            str(tmp_path / "out")], capsys)  # fmt: skip
    line = one_error_line(err)
    assert code == 2 and f"could not write {target}: permission denied" in line
    assert "nothing was written to model.safetensors; make the folder writable" in line


# ---------------------------------------------------------------- memory


def test_a_head_that_cannot_fit_is_refused_before_allocating(images, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    t0 = time.process_time()
    code, _, err = run_cli(train(images, run, "--out-dim", "100000000"), capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith("dino: error: --out-dim 100000000 needs more memory")
    assert "GB are available; lower --out-dim" in line
    assert time.process_time() - t0 < 60  # nothing of that size was allocated
    assert not (run / "checkpoint.pth").exists()


def test_an_allocation_failure_is_one_line(images, tmp_path, monkeypatch, capsys) -> None:
    import dino.training.trainer

    def no_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 102400000000 bytes. Error code 12"
        )

    monkeypatch.setattr(dino.training.trainer, "train_step", no_memory)
    code, _, err = run_cli(train(images, tmp_path / "run"), capsys)
    line = error_line(err)
    assert code == 2 and "out of memory" in line and "lower --batch-size" in line
