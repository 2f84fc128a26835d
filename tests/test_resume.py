"""Never lose a run: kill ``dino train`` at any moment, resume it, get the uninterrupted run.

Every scenario kills a real training process (SIGKILL installed by
``tests/helpers/train_with_faults.py`` or sent by the test, or SIGTERM / SIGINT), resumes it
with ``dino train --resume`` and checks that the final student, teacher, optimizer and center
are bit-identical (``torch.equal``, CPU fp32) to those of an uninterrupted run of the same
config, and that ``metrics.jsonl`` holds the same lines. The config exercises everything a step
depends on: drop path (torch's generator), a DataLoader worker with per-sample augmentation
seeds, a k-NN evaluation at each epoch end, checkpoints every 2 iterations with one older file
kept. Runs take a few seconds each; the processes to kill are subprocesses, the runs to their
end (reference, last resume) run in the test process to save the start-up time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.faults import install_stop_before_step
from PIL import Image

from dino.cli import main
from dino.data.fashion_mnist import FASHION_MNIST_DIRS
from dino.errors import DinoError
from dino.training.checkpoint import (
    LATEST,
    has_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)

# 2 classes x 20 training images, batch 8: 5 steps an epoch, 10 in all; checkpoints at 2, 4,
# 5 (epoch end), 6, 8, 10 (epoch end); k-NN after epoch 1 and at the end.
TINY = [
    "--arch", "vit_pico", "--depth", "2", "--patch-size", "4", "--drop-path-rate", "0.2",
    "--global-size", "16", "--local-size", "8", "--local-crops", "2", "--blur-sigma", "0.1", "0.5",
    "--out-dim", "32", "--head-hidden-dim", "32", "--head-bottleneck-dim", "16",
    "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "0.5", "--precision", "fp32",
    "--device", "cpu", "--save-every", "2", "--keep", "1", "--log-every", "1",
    "--eval-every", "1", "--eval-resize", "16", "--eval-crop", "16", "--knn-k", "5",
]  # fmt: skip
STEPS = 10


WITH_FAULTS = Path(__file__).parent / "helpers" / "train_with_faults.py"


def dino_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FAULTS"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def dino(args: list[str], cwd: Path, faults: str = "") -> subprocess.CompletedProcess:
    """Run ``python -m dino ARGS`` to its end; with ``faults`` (see
    ``tests/helpers/train_with_faults.py``), the same command with those faults installed."""
    command = [str(WITH_FAULTS)] if faults else ["-m", "dino"]
    return subprocess.run(
        [sys.executable, *command, *args],
        cwd=cwd,
        env=dino_env(FAULTS=faults),
        capture_output=True,
        text=True,
        timeout=300,
    )


def train_args(data: Path, run: Path, *extra: str, workers: int = 1) -> list[str]:
    return ["train", "--data", str(data), *TINY, "--num-workers", str(workers),
            "--output-dir", str(run), *extra]  # fmt: skip


def expect(proc: subprocess.CompletedProcess, rc: int) -> None:
    assert proc.returncode == rc, f"exit code {proc.returncode}, expected {rc}:\n{proc.stderr}"


def write_images(root: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, base in enumerate(([200, 60, 40], [50, 110, 220])):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pix = np.clip(np.array(base) + rng.normal(0, 50, (20, 20, 3)), 0, 255)
            Image.fromarray(pix.astype(np.uint8)).save(root / f"c{c}" / f"{i:02d}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train", 20, 0)
    write_images(root / "val", 6, 1)
    return root


def resume(run: Path) -> None:
    """``dino train --resume RUN`` in this process, to its end."""
    assert main(["train", "--resume", str(run)]) == 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(data, run)) == 0
    return run


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(reference: Path, run: Path) -> None:
    """Bit-identical final state, same metrics lines, same evaluations."""
    a, b = load_checkpoint(reference / LATEST), load_checkpoint(run / LATEST)
    assert a["iteration"] == b["iteration"] == STEPS
    for net in ("student", "teacher"):
        assert a[net].keys() == b[net].keys()
        for name in a[net]:
            assert torch.equal(a[net][name], b[net][name]), f"{net} {name} differs"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    assert a["knn_history"] == b["knn_history"]
    assert a["monitor"] == b["monitor"]
    assert metrics_rows(reference) == metrics_rows(run)
    ref_results = json.loads((reference / "results.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert results["knn"] == ref_results["knn"]
    assert not [p for p in os.listdir(run) if ".tmp-" in p or ".link-" in p]


@pytest.mark.slow
def test_sigkill_at_four_moments_then_resume_is_exact(data, reference, tmp_path) -> None:
    """One run killed four times, resumed after each: before its first checkpoint (then it
    starts over), mid-epoch (iteration 3, checkpoint 2), right after writing checkpoint 4, and
    in the middle of writing checkpoint 6 (the latest, 5, stays intact)."""
    run = tmp_path / "run"
    kills = ["kill-before-step:1", "kill-before-step:3", "kill-before-step:4",
             "kill-while-saving:6"]  # fmt: skip
    for i, kill in enumerate(kills):
        args = train_args(data, run) if i == 0 else ["train", "--resume", str(run)]
        proc = dino(args, tmp_path, faults=kill)
        expect(proc, -signal.SIGKILL)
        done = max(r["iteration"] for r in metrics_rows(run) if "loss" in r)
        if i == 0:
            assert done == 0 and not has_checkpoint(run)
        elif i == 1:
            assert done == 2 and load_checkpoint(run)["iteration"] == 2
        elif i == 2:  # right after writing checkpoint 4
            assert done == 3 and load_checkpoint(run)["iteration"] == 4
        else:  # the half-written file is there, the latest is intact
            assert done == 5 and load_checkpoint(run)["iteration"] == 5
            assert [p for p in os.listdir(run) if ".tmp-" in p]
    resume(run)
    assert_same_run(reference, run)


def wait_for_iteration(proc: subprocess.Popen, run: Path, iteration: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        try:
            rows = metrics_rows(run)
        except (FileNotFoundError, json.JSONDecodeError):
            rows = []
        if any(r.get("iteration", -1) >= iteration and "loss" in r for r in rows):
            return
        time.sleep(0.005)
    raise AssertionError("the run made no progress")


@pytest.mark.slow
def test_external_sigkill_at_a_random_moment(data, reference, tmp_path) -> None:
    """Killed from outside whenever it happens to be (a step, a save, an evaluation)."""
    target = int(np.random.default_rng().integers(1, 7))
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dino", *train_args(data, run)],
        cwd=tmp_path,
        env=dino_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_iteration(proc, run, target)
        proc.kill()
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"not killed (iteration {target})"
    resume(run)
    assert_same_run(reference, run)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits(sig, data, reference, tmp_path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dino", *train_args(data, run)],
        cwd=tmp_path,
        env=dino_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_iteration(proc, run, 2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "saving a checkpoint" in err and f"--resume {run}" in err
    state = load_checkpoint(run)
    done = [r["iteration"] for r in metrics_rows(run) if "loss" in r]
    assert state["iteration"] == max(done) + 1  # the checkpoint holds every finished step
    if sig == signal.SIGTERM:
        resume(run)
        assert_same_run(reference, run)


def test_stop_at_an_epoch_end_before_its_evaluation(data, reference, tmp_path, monkeypatch):
    """A stop request right after the last step of epoch 1 saves checkpoint 5 before the
    epoch's k-NN evaluation; the resumed run evaluates first, then goes on."""
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        install_stop_before_step(m, 5)
        with pytest.raises(SystemExit) as info:
            main(train_args(data, run, workers=0))
    assert info.value.code == 128 + signal.SIGTERM
    state = load_checkpoint(run)
    assert state["iteration"] == 5 and state["knn_history"] == []
    resume(run)
    assert_same_run(reference, run)


@pytest.mark.slow
def test_resume_falls_back_past_unreadable_checkpoints(data, reference, tmp_path, caplog) -> None:
    """Killed while writing the epoch-end checkpoint (5), then the latest file (4) is damaged in
    place: checkpoint-00000004.pth is the same file (a hard link), so resuming falls back to
    checkpoint 2."""
    run = tmp_path / "run"
    expect(dino(train_args(data, run), tmp_path, faults="kill-while-saving:5"), -signal.SIGKILL)
    latest, copy = run / LATEST, run / "checkpoint-00000004.pth"
    assert load_checkpoint(run)["iteration"] == 4
    for damaged, expected in ((latest, 2), (copy, 2)):
        with open(damaged, "r+b") as f:
            f.truncate(damaged.stat().st_size // 3)
        assert load_checkpoint(run)["iteration"] == expected
    resume(run)
    assert "checkpoint-00000002.pth instead" in caplog.text
    assert_same_run(reference, run)


@pytest.mark.slow
@pytest.mark.skipif(
    not any((d / "train-images-idx3-ubyte.gz").exists() for d in FASHION_MNIST_DIRS),
    reason="Fashion-MNIST is not installed",
)
def test_in_memory_data_sigkill_then_resume_is_exact(tmp_path) -> None:
    """The batched tensor augmentation path (built-in data set, no DataLoader)."""
    args = ["train", *TINY, "--subset", "512", "--batch-size", "64", "--global-size", "28",
            "--local-size", "14", "--patch-size", "7", "--eval-resize", "28", "--eval-crop",
            "28", "--num-workers", "0"]  # fmt: skip
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--output-dir", str(ref)]) == 0
    killed = dino([*args, "--output-dir", str(run)], tmp_path, faults="kill-before-step:11")
    expect(killed, -signal.SIGKILL)
    resume(run)
    a, b = load_checkpoint(ref), load_checkpoint(run)
    assert a["iteration"] == b["iteration"] == 16
    for net in ("student", "teacher"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net])
    assert metrics_rows(ref) == metrics_rows(run)


# ---------------------------------------------------------------- checkpoint files


def state(iteration: int) -> dict:
    return {"student": {"w": torch.full((2,), float(iteration))}, "iteration": iteration}


def test_load_falls_back_to_newest_readable_numbered(tmp_path, caplog) -> None:
    for it in (10, 20, 30):
        save_checkpoint(state(it), tmp_path, keep=2)
    latest = tmp_path / LATEST
    # replaced by garbage (a new file): checkpoint-30 is intact
    latest.unlink()
    latest.write_bytes(b"garbage")
    assert load_checkpoint(tmp_path)["iteration"] == 30
    assert "not a readable checkpoint" in caplog.text
    # damaged in place: checkpoint-30 is the same file, so 20 is the newest readable one
    latest.unlink()
    os.link(tmp_path / "checkpoint-00000030.pth", latest)
    with open(latest, "r+b") as f:
        f.truncate(10)
    assert load_checkpoint(tmp_path)["iteration"] == 20
    # missing latest
    latest.unlink()
    assert load_checkpoint(tmp_path)["iteration"] == 20
    # a file asked for by name never falls back
    with pytest.raises(DinoError, match="checkpoint-00000030.pth"):
        load_checkpoint(tmp_path / "checkpoint-00000030.pth")


def test_load_fails_clearly_when_nothing_is_readable(tmp_path) -> None:
    save_checkpoint(state(1), tmp_path, keep=1)
    for p in tmp_path.iterdir():
        p.write_bytes(b"")
    with pytest.raises(DinoError, match="none of the numbered checkpoints"):
        load_checkpoint(tmp_path)
    assert has_checkpoint(tmp_path)
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    assert not has_checkpoint(tmp_path)


def test_remove_stale_temporaries(tmp_path) -> None:
    for name in (".checkpoint.pth.tmp-123", ".checkpoint.pth.link-9", ".bad_files.txt.tmp-7"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".hidden").write_bytes(b"x")
    (tmp_path / LATEST).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert len(removed) == 3
    assert sorted(os.listdir(tmp_path)) == [".hidden", LATEST]
