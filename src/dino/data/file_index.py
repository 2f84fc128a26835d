"""The image files of a folder, held compactly, and a cache of that list that survives runs.

A folder of 200 000 photos must not cost 200 000 Python objects: :class:`FileList` keeps every
path (relative to the folder) in one ``bytes`` buffer with an array of offsets, about
``len(path) + 8`` bytes per file, and labels are one ``int64`` array. DataLoader workers fork
from the training process and share these arrays; a list of strings would instead be copied
page by page into every worker as reference counts are touched.

:func:`index_folder` lists a folder once and caches the list in a file (``.<folder>.dino-index.npz``
beside the folder when its parent is writable, else in a fallback folder such as the run
folder), so that a resumed or second run does not list it again. The cache records every
subfolder's modification time: adding, removing or renaming a file or folder anywhere below
changes one of them, and the next run lists the folder again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

#: Bumped when the cache's content or the listing rules change.
_CACHE_VERSION = 1


class FileList(Sequence[str]):
    """Paths below ``root``: ``files[i]`` is the full path of file ``i`` (a ``str``), a slice is
    another :class:`FileList`. Names are stored as the file system's bytes (``os.fsencode``)."""

    def __init__(self, root: str | Path, blob: bytes, offsets: np.ndarray) -> None:
        self.root = str(root)
        self._blob = blob
        self._offsets = np.asarray(offsets, dtype=np.int64)

    @classmethod
    def from_paths(cls, root: str | Path, paths: Sequence[str | Path]) -> FileList:
        """From paths relative to ``root`` or absolute paths below it."""
        root = str(root)
        rel = [os.fsencode(os.path.relpath(p, root) if os.path.isabs(p) else str(p)) for p in paths]
        offsets = np.zeros(len(rel) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rel], out=offsets[1:])
        return cls(root, b"".join(rel), offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def relative(self, i: int) -> str:
        """File ``i``'s path relative to :attr:`root`."""
        o = self._offsets
        return os.fsdecode(self._blob[o[i] : o[i + 1]])

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> FileList: ...
    def __getitem__(self, i: int | slice) -> str | FileList:
        if isinstance(i, slice):
            o = self._offsets
            rows = range(len(self))[i]
            if rows.step == 1:  # contiguous: one slice of the buffer
                sel = o[rows.start : rows.start + len(rows) + 1]
                return FileList(self.root, self._blob[sel[0] : sel[-1]], sel - sel[0])
            parts = [self._blob[o[k] : o[k + 1]] for k in rows]
            offsets = np.zeros(len(parts) + 1, dtype=np.int64)
            np.cumsum([len(p) for p in parts], out=offsets[1:])
            return FileList(self.root, b"".join(parts), offsets)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"file {i} of {n}")
        return os.path.join(self.root, self.relative(i % n))

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield os.path.join(self.root, self.relative(i))

    def nbytes(self) -> int:
        """Memory held by the paths."""
        return len(self._blob) + self._offsets.nbytes


@dataclass
class FolderIndex:
    """What :func:`index_folder` found: the image files (sorted), their labels (the first-level
    folder when every image sits in one, else -1), the class names, and how many other files
    were skipped."""

    files: FileList
    labels: np.ndarray
    classes: list[str]
    others: int
    from_cache: bool = False


def _list(root: str, extensions: set[str]) -> tuple[list[str], int, list[tuple[str, int]]]:
    """Relative paths of the image files below ``root`` (hidden files and folders skipped,
    symbolic links to folders not followed), the number of other files, and ``(folder,
    mtime_ns)`` of every folder listed (its time taken before listing it)."""
    files: list[str] = []
    others = 0
    dirs: list[tuple[str, int]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        dirs.append((rel, os.stat(path).st_mtime_ns))
        with os.scandir(path) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                name = os.path.join(rel, entry.name) if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(name)
                elif os.path.splitext(entry.name)[1].lower() in extensions and entry.is_file():
                    files.append(name)
                else:
                    others += 1
    files.sort()
    return files, others, dirs


def _labels(files: list[str]) -> tuple[np.ndarray, list[str]]:
    """Class = first-level folder when every file sits in one, else -1 everywhere."""
    if not files or any(os.sep not in f for f in files):
        return np.full(len(files), -1, dtype=np.int64), []
    tops = [f.split(os.sep, 1)[0] for f in files]
    classes = sorted(set(tops))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.fromiter((index[t] for t in tops), dtype=np.int64, count=len(tops))
    return labels, classes


def cache_path(root: str | Path, fallback: str | Path | None = None) -> Path | None:
    """Where the index of ``root`` is cached: ``.<name>.dino-index.npz`` in ``root``'s parent
    when that is writable, else ``<fallback>/file-index-<name>-<hash>.npz``, else nowhere."""
    root = Path(os.path.abspath(root))
    parent = root.parent
    if root != parent and os.access(parent, os.W_OK | os.X_OK):
        return parent / f".{root.name}.dino-index.npz"
    if fallback is not None:
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
        return Path(fallback) / f"file-index-{root.name or 'root'}-{digest}.npz"
    return None


def _signature(extensions: set[str]) -> str:
    return json.dumps({"version": _CACHE_VERSION, "extensions": sorted(extensions)})


def _pack(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = [os.fsencode(s) for s in strings]
    offsets = np.zeros(len(enc) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in enc], out=offsets[1:])
    return np.frombuffer(b"".join(enc), dtype=np.uint8), offsets


def _unpack(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = blob.tobytes()
    return [os.fsdecode(raw[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def _load(path: Path, root: str, extensions: set[str]) -> FolderIndex | None:
    """The cached index at ``path`` if it describes ``root`` as it is now, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("signature") != _signature(extensions) or meta.get("root") != root:
                return None
            dir_names = _unpack(z["dir_blob"], z["dir_offsets"])
            for rel, mtime in zip(dir_names, z["dir_mtimes"].tolist(), strict=True):
                full = os.path.join(root, rel) if rel else root
                if os.stat(full).st_mtime_ns != mtime:
                    return None
            files = FileList(root, z["blob"].tobytes(), z["offsets"])
            return FolderIndex(files, z["labels"], meta["classes"], meta["others"], True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # missing, unreadable, from another version, or a folder gone: list again


def _save(path: Path, root: str, extensions: set[str], index: FolderIndex, dirs) -> None:
    """Write the cache atomically; a folder we cannot write to just means no cache."""
    dir_blob, dir_offsets = _pack([d for d, _ in dirs])
    meta = {
        "signature": _signature(extensions),
        "root": root,
        "classes": index.classes,
        "others": index.others,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                    blob=np.frombuffer(index.files._blob, dtype=np.uint8),
                    offsets=index.files._offsets,
                    labels=index.labels,
                    dir_blob=dir_blob,
                    dir_offsets=dir_offsets,
                    dir_mtimes=np.array([m for _, m in dirs], dtype=np.int64),
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass


def index_folder(
    root: str | Path, extensions: set[str], cache_dir: str | Path | None = None
) -> FolderIndex:
    """The image files below ``root`` (see :class:`FolderIndex`), from the cache when it is
    still valid (:func:`cache_path`), else listed and cached."""
    root_s = os.path.abspath(root)
    where = cache_path(root_s, cache_dir)
    index = None
    if where is not None and where.exists():
        index = _load(where, root_s, extensions)
    if index is None:
        files, others, dirs = _list(root_s, extensions)
        labels, classes = _labels(files)
        index = FolderIndex(FileList.from_paths(root_s, files), labels, classes, others)
        del files
        if where is not None:
            _save(where, root_s, extensions, index, dirs)
    index.files.root = str(root)  # paths as the caller wrote the folder
    return index
