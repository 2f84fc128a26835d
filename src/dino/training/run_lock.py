"""One writer per run folder: an exclusive lock on ``RUN_DIR/run.lock`` for the life of a run.

The lock is a POSIX record lock (``fcntl.lockf``), which the operating system releases when the
process ends, however it ends (a crashed or killed run never needs cleaning up). POSIX locks
work across machines on NFS (v4 natively, v3 through the lock daemon) and on Lustre mounted with
``-o flock``; a file system that refuses them gets a warning and the run goes on unlocked. The
file records the holder (pid, host, start time) for the message a second writer gets.

The lock belongs to the process (POSIX semantics): the same process may take it again (it is
counted), and only :func:`release` (or the end of the process) lets it go. In a multi-process
run only rank 0 takes it; the others wait for rank 0 at the first barrier.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from dino.atomic_files import WriteFailure, write_failure
from dino.errors import DinoError

LOCK_FILE = "run.lock"

log = logging.getLogger("dino")

#: The locks this process holds: resolved folder -> (file descriptor, times taken).
_held: dict[Path, list[int]] = {}


def holder(run_dir: str | Path) -> dict | None:
    """The holder that ``run.lock`` in ``run_dir`` records (pid, host, since), or None."""
    held = _held.get(Path(run_dir).resolve())
    try:
        if held is not None and held[0] >= 0:  # closing another descriptor would unlock it
            text = os.pread(held[0], 4096, 0).decode()
        else:
            with open(Path(run_dir) / LOCK_FILE) as f:
                text = f.read()
        info = json.loads(text or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe(info: dict | None) -> str:
    if not info:
        return "another process (which is starting)"
    return f"process {info.get('pid')} on {info.get('host')} (since {info.get('since')})"


def acquire(run_dir: str | Path) -> None:
    """Take the lock of ``run_dir`` (created if missing) or raise :class:`DinoError` naming the
    process that holds it; nothing is written to the folder then."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failure(run_dir / LOCK_FILE, exc) from None
    key = run_dir.resolve()
    if key in _held:
        _held[key][1] += 1
        return
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_failure(path, exc) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise DinoError(
                f"{run_dir} is in use by {describe(holder(run_dir))}: one run at a time writes "
                "to a run folder; wait for it to end, or choose another --output-dir"
            ) from None
        log.warning(
            "cannot lock %s (%s): this file system does not support POSIX locks, so nothing "
            "stops a second run from writing to the same folder",
            path,
            exc.strerror,
        )
        _held[key] = [-1, 1]
        return
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise write_failure(path, exc) from None
    _held[key] = [fd, 1]


def held_folders() -> set[Path]:
    """The (resolved) run folders whose lock this process holds."""
    return set(_held)


def release(run_dir: str | Path) -> None:
    """Give up one hold of the lock of ``run_dir`` (the lock itself with the last one)."""
    key = Path(run_dir).resolve()
    held = _held.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _held[key]
        if held[0] >= 0:
            os.close(held[0])  # closing the descriptor releases the lock


@contextmanager
def run_session() -> Iterator[None]:
    """Around one run: release the locks it took when it ends, and say, in a write failure
    inside a run folder, how to continue the run."""
    before = set(_held)
    try:
        yield
    except WriteFailure as exc:
        folder = exc.path.parent
        if folder.resolve() in _held and (folder / "config.yaml").exists():
            kept = ""
            if exc.path.name != "checkpoint.pth" and (folder / "checkpoint.pth").exists():
                kept = "; checkpoint.pth (the last checkpoint) is kept"
            message, fix = str(exc).removesuffix(" and run the command again").rsplit("; ", 1)
            raise DinoError(
                f"{message}{kept}; {fix}, then continue with `dino train --resume {folder}`"
            ) from None
        raise
    finally:
        for key in set(_held) - before:
            _held[key][1] = 1
            release(key)
