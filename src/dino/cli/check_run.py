"""``dino check-run RUN``: verify every file of a run folder."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from dino.errors import DinoError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "check-run",
        help="verify every file of a run folder (checksums, readability)",
        description="Verify every file of a `dino train` run folder: checkpoints and the "
        "teacher backbone against the checksum written with them (files written without one "
        "are loaded instead), config.yaml, results.json and every line of metrics.jsonl; say "
        "which checkpoints are hard links of each other, what interrupted writes left, and "
        "whether a run is writing to the folder now. Exit code 0 when every file is intact, 1 "
        "otherwise (the newest intact checkpoint is named).",
    )
    p.add_argument("folder", metavar="RUN", help="a run folder written by `dino train`")
    p.set_defaults(run=check_run)


def check_file(path: Path) -> tuple[bool, str]:
    """(intact, what was found) for one file of a run folder."""
    import yaml

    from dino.atomic_files import verify

    if path.suffix in (".pth", ".pt"):
        intact = verify(path)
        if intact is not None:
            return intact, "checksum ok" if intact else "DAMAGED: does not match its checksum"
        import torch

        try:
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            return False, f"DAMAGED: not readable ({type(exc).__name__})"
        return True, "readable (written without a checksum)"
    if path.suffix not in (".yaml", ".json", ".jsonl"):
        return True, "not checked"
    try:
        text = path.read_text()
        if path.suffix == ".yaml":
            yaml.safe_load(text)
        elif path.suffix == ".json":
            json.loads(text)
        elif path.suffix == ".jsonl":
            lines = text.splitlines()
            for i, line in enumerate(lines):
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:  # a kill tore it; resuming drops it
                        return True, f"{i} lines ok, the last one torn (dropped on resume)"
                    return False, f"DAMAGED: line {i + 1} is not JSON"
            return True, f"{len(lines)} lines ok"
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        return False, f"DAMAGED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return True, "ok"


def lock_state(run: Path) -> str:
    """Whether a process holds the run folder's lock now."""
    from dino.training import run_lock

    path = run / run_lock.LOCK_FILE
    if not path.exists():
        return "no run has locked it"
    if run.resolve() in run_lock.held_folders():
        return "in use by this process"
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return f"in use by {run_lock.describe(run_lock.holder(run))}"
    finally:
        os.close(fd)
    return "not in use (the last run's lock was released)"


def check_run(args: argparse.Namespace) -> int:
    from dino.atomic_files import newest_intact
    from dino.training.checkpoint import LATEST
    from dino.training.run_lock import LOCK_FILE

    run = Path(args.folder)
    if not run.is_dir():
        raise DinoError(f"{run} is not a folder; pass a run folder written by `dino train`")
    if not (run / "config.yaml").exists() and not any(run.glob("checkpoint*.pth")):
        raise DinoError(f"{run} is not a run folder (no config.yaml, no checkpoint)")
    damaged, inodes = [], {}
    for path in sorted(run.iterdir()):
        if path.is_dir() or path.name == LOCK_FILE:
            continue
        if path.name.startswith(".") and (".tmp-" in path.name or ".link-" in path.name):
            print(f"{path.name}: left by an interrupted write (removed on resume)")
            continue
        intact, what = check_file(path)
        st = path.stat()
        if st.st_nlink > 1 and path.suffix == ".pth":
            same = inodes.setdefault((st.st_dev, st.st_ino), path.name)
            if same != path.name:
                what += f" (hard link of {same})"
        print(f"{path.name}: {what}")
        if not intact:
            damaged.append(path)
    print(f"lock: {lock_state(run)}")
    if not damaged:
        print(f"{run}: every file is intact")
        return 0
    print(f"{run}: {len(damaged)} damaged file(s): {', '.join(p.name for p in damaged)}")
    if any(p.name.startswith("checkpoint") for p in damaged):
        intact = newest_intact(run / LATEST)
        print(
            f"newest intact checkpoint: {intact}; `dino train --resume {run}` falls back to it"
            if intact is not None
            else "no intact numbered checkpoint is left: start the run again in a new folder"
        )
    return 1
