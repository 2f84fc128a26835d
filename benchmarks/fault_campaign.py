"""A fault campaign: many tiny training runs, each hit by a fault at a random point, then
recovered as a user would; reports faults tried, survived, and anything lost.

``python benchmarks/fault_campaign.py --faults 100 --seed 0``

Every run is the same tiny one (ViT-pico of depth 2 on 16 made 20x20 PNGs, 4 steps, a checkpoint
every step, ``--keep 2``, CPU fp32), started as a forked child of this process (already holding
torch and dino in memory, so that a run takes about a second). The faults, drawn in turn:

* ``kill9``: SIGKILL at a random moment of the run;
* ``sigterm``: SIGTERM at a random moment (expected: a checkpoint, exit code 143);
* ``kill_while_saving``: SIGKILL in the middle of writing the checkpoint of a random iteration;
* ``disk_full``: every write of the run fails with ENOSPC once a random number of bytes (up to
  what the whole run writes) has been written (expected: one ``dino: error:`` line, exit 2);
* ``bitflip``: SIGKILL while writing the checkpoint of a random iteration (2 or later), then one
  random bit of a random checkpoint file is flipped (expected: the checksum finds it; resuming
  skips the damaged file, or, with no intact checkpoint left, the run starts again);
* ``two_writers``: two runs started together into the same new folder (expected: one trains,
  the other exits 2 naming the holder);
* ``two_resumes``: SIGKILL while writing the checkpoint of a random iteration (2 or later), then
  two resumes started together (expected: one resumes, the other exits 2 naming the holder).

Recovery: ``dino train --resume RUN`` until it succeeds (a folder without ``config.yaml``:
the run started again; no intact checkpoint left: the folder removed and the run started
again). A fault is survived when the run ends with every file intact (``dino check-run``), the
teacher, student and center bit-identical to the uninterrupted run's and the same
``metrics.jsonl`` lines, and when no process printed a traceback. Results:
``results/fault_campaign.json``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # no thread pool in the parent: safe to fork
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import dino.atomic_files  # noqa: E402
import dino.training.metrics  # noqa: E402
from dino.cli import main as dino_main  # noqa: E402

torch.set_num_threads(1)

FAULTS = ("kill9", "sigterm", "kill_while_saving", "disk_full", "bitflip", "two_writers",
          "two_resumes")  # fmt: skip
STEPS = 4
RUN = ["--arch", "vit_pico", "--depth", "2", "--patch-size", "4", "--drop-path-rate", "0.2",
       "--global-size", "16", "--local-size", "8", "--local-crops", "2", "--out-dim", "32",
       "--head-hidden-dim", "32", "--head-bottleneck-dim", "16", "--batch-size", "8",
       "--epochs", "2", "--warmup-epochs", "0.5", "--precision", "fp32", "--device", "cpu",
       "--save-every", "1", "--keep", "2", "--log-every", "1", "--eval-every", "0",
       "--eval-resize", "16", "--eval-crop", "16", "--knn-k", "5", "--num-workers", "0",
       "--tensorboard", "false", "--min-steps", "0"]  # fmt: skip


def make_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for c, base in enumerate(([200, 60, 40], [50, 110, 220])):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(8):
            pix = np.clip(np.array(base) + rng.normal(0, 50, (20, 20, 3)), 0, 255)
            Image.fromarray(pix.astype(np.uint8)).save(root / f"c{c}" / f"{i:02d}.png")


# ---------------------------------------------------------------- children


class Budget:
    """Bytes the 'disk' still takes (None: unlimited); counts what was written."""

    def __init__(self, left: int | None) -> None:
        self.left, self.written = left, 0


def install_disk(mp: pytest.MonkeyPatch, budget: Budget) -> None:
    """Every file the run writes counts against ``budget``; past it, writes fail with ENOSPC."""
    import builtins

    real_open = builtins.open

    class Disk:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: Any) -> int:
            n = len(data) if isinstance(data, str) else memoryview(data).nbytes
            if budget.left is not None and budget.written + n > budget.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            budget.written += n
            return self.f.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def __enter__(self) -> Disk:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

    def disk_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(path, mode, *args, **kwargs)
        return Disk(f) if ("w" in mode or "a" in mode) else f

    for module in (dino.atomic_files, dino.training.metrics):
        mp.setattr(module, "open", disk_open, raising=False)


def child(argv: list[str], log: Path, fault: dict[str, Any]) -> None:
    """The body of a forked child: ``dino ARGV`` with ``fault`` installed, output to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        mp = pytest.MonkeyPatch()
        budget = Budget(fault.get("disk_bytes"))
        install_disk(mp, budget)
        if "kill_while_saving" in fault:
            import faults

            faults.install_kill_while_saving(mp, fault["kill_while_saving"])
        try:
            code = dino_main(argv)
        finally:
            if fault.get("count_to"):
                Path(fault["count_to"]).write_text(str(budget.written))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn(argv: list[str], log: Path, fault: dict[str, Any] | None = None) -> int:
    pid = os.fork()
    if pid == 0:
        child(argv, log, fault or {})
    return pid


def wait(pid: int) -> int:
    """The exit code (negative: the signal that ended it)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run(argv: list[str], log: Path, fault: dict[str, Any] | None = None) -> int:
    return wait(spawn(argv, log, fault))


def run_killed(argv: list[str], log: Path, after: float, sig: int) -> int:
    """Start the run, send ``sig`` after ``after`` seconds (if it is still running)."""
    pid = spawn(argv, log)
    deadline = time.perf_counter() + after
    while time.perf_counter() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    return wait(pid)


# ---------------------------------------------------------------- one fault


class Campaign:
    def __init__(self, work: Path, seed: int) -> None:
        self.work, self.rng = work, random.Random(seed)
        self.images = work / "images"
        make_images(self.images)
        self.reference = work / "reference"
        count = work / "bytes.txt"
        t0 = time.perf_counter()
        rc = run(self.train(self.reference), work / "reference.log", {"count_to": str(count)})
        self.duration = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"the reference run failed:\n{(work / 'reference.log').read_text()}")
        self.bytes_written = int(count.read_text())
        self.ref = load_final(self.reference)

    def train(self, out: Path) -> list[str]:
        return ["train", "--data", str(self.images), *RUN, "--output-dir", str(out)]

    def one(self, i: int, kind: str) -> dict[str, Any]:
        folder = self.work / f"fault{i:04d}"
        folder.mkdir()
        out, logs = folder / "run", []

        def log() -> Path:
            logs.append(folder / f"{len(logs)}.log")
            return logs[-1]

        at = self.rng.uniform(0.02, 1.0) * self.duration
        record: dict[str, Any] = {"fault": kind}
        if kind in ("kill9", "sigterm"):
            sig = signal.SIGTERM if kind == "sigterm" else signal.SIGKILL
            record.update(at_s=round(at, 3), exit=run_killed(self.train(out), log(), at, sig))
        elif kind in ("kill_while_saving", "bitflip", "two_resumes"):
            # (bitflip, two_resumes: after the first checkpoint, so that there is one to hit)
            it = self.rng.randint(1 if kind == "kill_while_saving" else 2, STEPS)
            record.update(iteration=it, exit=run(self.train(out), log(), {"kill_while_saving": it}))
        elif kind == "disk_full":
            left = self.rng.randint(0, self.bytes_written)
            record.update(bytes=left, exit=run(self.train(out), log(), {"disk_bytes": left}))
            text = logs[-1].read_text()
            errors = [line for line in text.splitlines() if line.startswith("dino: error:")]
            record["one_line"] = record["exit"] == 0 or (
                len(errors) == 1 and "no space left on the disk" in errors[0]
            )
        elif kind == "two_writers":
            pids = [spawn(self.train(out), log()) for _ in range(2)]
            record["exits"] = sorted(wait(p) for p in pids)
            record["one_refused"] = record["exits"] == [0, 2] and any(
                "is in use by process" in p.read_text() or "already holds a run" in p.read_text()
                for p in logs
            )
        if kind == "bitflip":
            record.update(self.flip(out))
        if kind == "two_resumes" and (out / "config.yaml").exists():
            pids = [spawn(["train", "--resume", str(out)], log()) for _ in range(2)]
            record["exits"] = sorted(wait(p) for p in pids)
            record["one_refused"] = record["exits"] == [0, 2]
        record["recovery"] = self.recover(out, log)
        record.update(self.judge(out, logs, record.get("flipped")))
        expected = {"one_refused": "both writers ran", "one_line": "not one error line",
                    "detected": "corruption not detected"}  # fmt: skip
        failed = [what for key, what in expected.items() if record.get(key) is False]
        if failed:
            record.update(survived=False, problems=record["problems"] + failed)
        return record

    def flip(self, out: Path) -> dict[str, Any]:
        files = sorted(out.glob("checkpoint*.pth")) if out.exists() else []
        if not files:
            return {"flipped": None}
        path = self.rng.choice(files)
        offset = self.rng.randrange(path.stat().st_size)
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << self.rng.randrange(8))]))
        in_magic = (
            path.stat().st_size - dino.atomic_files.TRAILER
            <= offset
            < (path.stat().st_size - dino.atomic_files.TRAILER + len(dino.atomic_files.MAGIC))
        )
        verdict = dino.atomic_files.verify(path)
        return {
            "flipped": path.name,
            "offset": offset,
            # the marker itself hit: the file reads as one without a checksum, its content intact
            "detected": verdict is False or (in_magic and verdict is None),
        }

    def recover(self, out: Path, log: Any) -> list[str]:
        """What a user does: resume until it succeeds; start again if nothing is left."""
        steps = []
        for _ in range(4):
            if (out / "results.json").exists():
                break
            if not (out / "config.yaml").exists():
                steps.append("start again")
                rc = run(self.train(out), log())
            else:
                steps.append("resume")
                path = log()
                rc = run(["train", "--resume", str(out)], path)
                if rc == 2 and "none of the numbered checkpoints" in path.read_text():
                    steps.append("no intact checkpoint: remove the folder, start again")
                    shutil.rmtree(out)
                    rc = run(self.train(out), log())
            if rc == 0:
                break
        return steps

    def judge(self, out: Path, logs: list[Path], flipped: str | None) -> dict[str, Any]:
        """Survived: finished, every file intact but the one flipped on purpose (an older
        checkpoint the run never needed again stays damaged, and check-run names it), the
        uninterrupted run's weights and metrics, no traceback."""
        tracebacks = [p.name for p in logs if "Traceback" in p.read_text()]
        problems = []
        if not (out / "results.json").exists():
            problems.append("not finished")
        else:
            from dino.cli.check_run import check_file

            bad = [p.name for p in out.iterdir() if p.is_file() and not check_file(p)[0]]
            bad = [name for name in bad if name != flipped]
            if bad:
                problems.append(f"damaged files {bad}")
            final = load_final(out)
            for name, ref in self.ref.items():
                if not same(ref, final[name]):
                    problems.append(f"{name} differs from the uninterrupted run")
        if tracebacks:
            problems.append(f"traceback in {tracebacks}")
        return {"survived": not problems, "problems": problems}


def load_final(run: Path) -> dict[str, Any]:
    state = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "teacher": state["teacher"],
        "student": state["student"],
        "center": state["dino_loss"]["center"],
        "metrics": rows,
        "iteration": state["iteration"],
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def campaign(
    faults: int, seed: int, work: Path, budget_s: float | None = None, kinds: tuple = FAULTS
) -> dict:
    t0 = time.perf_counter()
    c = Campaign(work, seed)
    records = []
    for i in range(faults):
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
        kind = kinds[i % len(kinds)] if i < len(kinds) else c.rng.choice(kinds)
        rec = c.one(i, kind)
        records.append(rec)
        status = "survived" if rec["survived"] else f"LOST: {rec['problems']}"
        print(f"{i + 1:4d} {kind:18s} {status}", flush=True)
    tried = Counter(r["fault"] for r in records)
    survived = Counter(r["fault"] for r in records if r["survived"])
    flips = [r for r in records if r.get("flipped")]
    return {
        "seed": seed,
        "faults_asked": faults,
        "faults_tried": len(records),
        "survived": sum(survived.values()),
        "lost_or_mixed": len(records) - sum(survived.values()),
        "corruptions": len(flips),
        "corruptions_detected": sum(bool(r["detected"]) for r in flips),
        "by_fault": {k: {"tried": tried[k], "survived": survived[k]} for k in FAULTS},
        "reference_run_s": round(c.duration, 2),
        "reference_bytes_written": c.bytes_written,
        "wall_s": round(time.perf_counter() - t0, 1),
        "records": records,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting faults after it")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fault_campaign.json"))
    ap.add_argument("--keep-work", action="store_true", help="keep the run folders")
    ap.add_argument("--only", nargs="+", choices=FAULTS, default=list(FAULTS), help="fault kinds")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dino-faults-"))
    try:
        result = campaign(args.faults, args.seed, work, args.budget_s, tuple(args.only))
        print(f"run folders: {work}" if args.keep_work else "", end="")
    finally:
        if not args.keep_work:  # (kept: printed above)
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": "2-core AMD EPYC VM shared with other jobs (timings under load)",
        "command": f"python benchmarks/fault_campaign.py --faults {args.faults} --seed {args.seed}"
        + (f" --budget-s {args.budget_s:g}" if args.budget_s is not None else ""),
        **result,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k != "records"}
    print(json.dumps(summary, indent=2))
    return 0 if result["lost_or_mixed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
