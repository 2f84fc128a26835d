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
#: How to leave a folder as it was if the run that locked it is refused before it starts:
#: resolved folder -> (folder created?, the lock file's previous bytes and times, or None).
_before: dict[Path, tuple[bool, tuple[bytes, int, int] | None]] = {}


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
    created = not run_dir.exists()
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
        st = path.stat()
        previous = (path.read_bytes(), st.st_atime_ns, st.st_mtime_ns)
    except OSError:
        previous = None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_failure(path, exc) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)  # (the lock file is the holder's: never removed here)
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
    _before[key] = (created, previous)


def _remove_empty(folder: Path) -> None:
    """Remove the lock file and ``folder`` if nothing else is in it."""
    try:
        (folder / LOCK_FILE).unlink(missing_ok=True)
        folder.rmdir()
    except OSError:  # not empty (another run's files), or gone
        pass


def _restore(key: Path) -> None:
    """Leave the folder ``key`` as it was before :func:`acquire` (called holding the lock)."""
    created, previous = _before.pop(key, (False, None))
    path = key / LOCK_FILE
    try:
        if previous is None:
            path.unlink(missing_ok=True)
            if created:
                _remove_empty(key)
        else:
            os.pwrite(_held[key][0], previous[0], 0)
            os.ftruncate(_held[key][0], len(previous[0]))
            os.utime(path, ns=previous[1:])
    except OSError:
        pass


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


class Session:
    """What :func:`run_session` yields; :meth:`started` marks the end of the checks."""

    def __init__(self) -> None:
        self.before, self.is_started = set(_held), False

    def started(self) -> None:
        """The run passed its checks: from now on its folder is its own."""
        self.is_started = True
        for key in set(_held) - self.before:
            _before.pop(key, None)


@contextmanager
def run_session() -> Iterator[Session]:
    """Around one run: release the locks it took when it ends, leave the folder as it was if
    the run is refused before :meth:`Session.started`, and say, in a write failure inside a run
    folder, how to continue the run."""
    session = Session()
    before = session.before
    try:
        yield session
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
            if not session.is_started and key in _before and _held[key][0] >= 0:
                _restore(key)
            _held[key][1] = 1
            release(key)
