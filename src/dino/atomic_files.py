"""Every file a command writes goes through here: written atomically, checksummed where it is
a PyTorch file, and failing as one clear error.

* **Atomic**: to a temporary file beside the target (``.<name>.tmp-<pid>``), flushed to disk,
  renamed over the target. A kill at any moment leaves the previous file or the new one, never a
  torn file.
* **Checksummed**: :func:`save_torch` appends a 24-byte trailer to what ``torch.save`` writes,
  ``DINOXXH3`` and the XXH3-128 digest of the bytes before it, computed while they are written.
  ``torch.load`` ignores the trailer (a zip archive is read from its end directory), so the files
  stay plain PyTorch files; :func:`load_torch` verifies it first, :func:`verify` alone.
* **Failing clearly**: an ``OSError`` while writing (no space, quota, permission, read-only)
  becomes a :class:`WriteFailure`, a :class:`~dino.errors.DinoError` that says which file could
  not be written, why, that the previous version was kept, and what to do.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import mmap
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
import xxhash

from dino.errors import DinoError

MAGIC = b"DINOXXH3"
TRAILER = len(MAGIC) + 16

#: Why a write failed, by errno, and what frees the way.
_WHY = {
    errno.ENOSPC: ("no space left on the disk", "free some space"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or raise the quota"),
    errno.EACCES: ("permission denied", "make the folder writable"),
    errno.EPERM: ("operation not permitted", "make the folder writable"),
    errno.EROFS: ("the file system is read-only", "write to a writable disk"),
    errno.EIO: ("an input/output error of the disk", "check the disk"),
    errno.EFBIG: ("the file is too large for the file system", "write to another disk"),
}

#: The errors of a write that the user can fix (reported as one line, not a traceback).
WRITE_ERRNOS = frozenset(_WHY)


class WriteFailure(DinoError):
    """A file could not be written; ``path`` is the file, ``errno`` the reason's code."""

    def __init__(self, message: str, path: Path, code: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = code


def write_failure(
    path: str | Path, exc: OSError, then: str = "run the command again"
) -> WriteFailure:
    """The :class:`WriteFailure` for ``exc`` raised while writing ``path``; ``then``: how to
    continue once the cause is fixed."""
    path = Path(path)
    why, fix = _WHY.get(exc.errno or 0, (exc.strerror or str(exc), "fix the cause"))
    kept = (
        f"the previous {path.name} is kept"
        if path.exists()
        else f"nothing was written to {path.name}"
    )
    return WriteFailure(f"could not write {path}: {why}; {kept}; {fix} and {then}", path, exc.errno)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it over
    ``path``. On any failure the temporary file is removed and ``path`` is untouched; an
    ``OSError`` becomes a :class:`WriteFailure`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except OSError as exc:
        _remove_quietly(tmp)
        raise write_failure(path, exc) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a read-only folder: nothing was created there either
        pass


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (not possible everywhere: then it is skipped)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (its folder created)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failure(path, exc) from None
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (its folder created)."""
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (its folder created)."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- checksummed PyTorch files


class _Hashing:
    """A binary file that hashes what is written through it, and keeps the first ``OSError``
    of a write (``torch.save`` reports a failed write of its C++ writer as a ``RuntimeError``
    about file positions: the real cause is raised instead)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.hash = f, xxhash.xxh3_128()
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            n = self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.hash.update(data)
        return n

    def flush(self) -> None:
        self.f.flush()


def write_torch(obj: Any, f: IO[bytes]) -> None:
    """``torch.save(obj, f)`` followed by the checksum trailer."""
    hashing = _Hashing(f)
    try:
        torch.save(obj, hashing)  # type: ignore[arg-type]
    except Exception:
        if hashing.error is not None:
            raise hashing.error from None
        raise
    f.write(MAGIC + hashing.hash.digest())


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` with a checksum, through :func:`atomic_write`."""
    atomic_write(path, lambda f: write_torch(obj, f))


def verify(path: str | Path) -> bool | None:
    """Whether the content of ``path`` matches its checksum trailer (None: it has none, as files
    written by other programs)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < TRAILER:
            return None
        f.seek(size - TRAILER)
        trailer = f.read(TRAILER)
        if not trailer.startswith(MAGIC):
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:  # no copy
            with memoryview(mapped) as view:
                digest = xxhash.xxh3_128(view[: size - TRAILER])
    return digest.digest() == trailer[len(MAGIC) :]


class CorruptFile(DinoError):
    """A file whose content does not match its checksum."""


def numbered_versions(path: Path) -> list[Path]:
    """The numbered versions ``<stem>-<digits><suffix>`` beside ``path`` (``checkpoint.pth``:
    ``checkpoint-00000040.pth`` ...), newest (highest number) first."""
    stem = path.stem.rsplit("-", 1)[0] if re.search(r"-\d+$", path.stem) else path.stem
    pattern = re.compile(rf"{re.escape(stem)}-\d+{re.escape(path.suffix)}$")
    return sorted((p for p in path.parent.glob(f"{stem}-*") if pattern.match(p.name)), reverse=True)


def newest_intact(path: Path) -> Path | None:
    """The newest numbered version beside ``path`` (:func:`numbered_versions`), other than
    ``path`` itself or a hard link to it, that matches its checksum."""
    for p in numbered_versions(path):
        try:
            same = path.exists() and os.path.samefile(p, path)
            if not same and verify(p):
                return p
        except OSError:  # vanished meanwhile
            continue
    return None


def check_intact(path: str | Path, hint: bool = True) -> None:
    """Raise :class:`CorruptFile` when ``path`` does not match its checksum; with ``hint``, the
    message names the newest intact numbered version beside it."""
    path = Path(path)
    if verify(path) is not False:
        return
    instead = "use another copy of it"
    intact = newest_intact(path) if hint else None
    if intact is not None:
        instead = (
            f"the newest intact one is {intact}: continue from it (`dino train --resume "
            f"{intact} --output-dir NEW`, or `--resume {path.parent}`, which falls back to it)"
        )
    elif hint and numbered_versions(path):
        instead = "no intact numbered version is left beside it"
    raise CorruptFile(
        f"{path} is damaged: its content does not match the checksum written with it; {instead}"
    )


def load_torch(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, **kwargs)`` after :func:`check_intact` (used for files of other
    commands; training checkpoints go through :mod:`dino.training.checkpoint`)."""
    check_intact(path)
    return torch.load(path, **kwargs)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file (folders created; atomically: a kill leaves no torn file)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_text(path, buf.getvalue())


def reserve(path: str | Path, size: int) -> None:
    """Allocate ``size`` bytes of the file ``path`` on disk now, so that a memory-mapped file
    written later cannot run out of space half-way (a page written to a full disk through a map
    kills the process with SIGBUS instead of raising); no space is a :class:`WriteFailure`."""
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without allocation
            return
        _remove_quietly(Path(path))
        raise write_failure(path, exc) from None
