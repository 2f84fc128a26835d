"""``dino check-data``: find every image of a folder that training could not decode.

Training replaces an unreadable image by another one and lists it in ``bad_files.txt`` when it
meets it; this scan finds all of them up front, decoding every file exactly as training does
(:func:`dino.data.datasets.load_image`) in a pool of processes.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dino.data.datasets import IMAGE_EXTENSIONS, BadImage, load_image
from dino.data.file_index import index_folder
from dino.errors import DinoError

_FORMAT_OF_EXTENSION = {ext.lower(): fmt for ext, fmt in Image.registered_extensions().items()}
_MODE_NAMES = {
    "1": "1-bit",
    "L": "grayscale",
    "LA": "grayscale + alpha",
    "P": "palette",
    "PA": "palette + alpha",
    "RGBA": "RGBA",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "Lab",
    "HSV": "HSV",
    "I": "32-bit integer",
    "F": "32-bit float",
    "I;16": "16-bit",
    "I;16B": "16-bit",
    "I;16L": "16-bit",
}


@dataclass
class FileCheck:
    """The verdict on one file: ``error`` is None when it decodes."""

    path: str
    error: str | None = None
    mode: str | None = None
    format: str | None = None


@dataclass
class CheckReport:
    """What :func:`check_folder` found."""

    root: Path
    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    converted: Counter[str] = field(default_factory=Counter)
    mislabeled: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        n_bad = len(self.bad)
        pct = 100.0 * n_bad / self.checked if self.checked else 0.0
        lines = [
            f"{self.checked} image files checked in {self.root}: "
            f"{self.checked - n_bad} readable, {n_bad} unreadable ({pct:.2f}%)"
        ]
        if self.converted:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.converted.items()))
            lines.append(f"converted to 8-bit RGB when loading (fine): {kinds}")
        if self.mislabeled:
            path, fmt = self.mislabeled[0]
            lines.append(
                f"{len(self.mislabeled)} readable files whose extension does not match their "
                f"content (fine: decoded by content), e.g. {path} is {fmt}"
            )
        if self.ignored:
            lines.append(f"{self.ignored} files without an image extension ignored")
        return "\n".join(lines)


def check_file(path: str) -> FileCheck:
    """Decode ``path`` as training does; never raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode, fmt = im.mode, im.format
    except Exception:  # load_image says why below
        mode = fmt = None
    try:
        load_image(path)
    except BadImage as exc:
        return FileCheck(path, str(exc).removeprefix(f"{path}: "))
    return FileCheck(path, None, mode, fmt)


def list_files(root: str | Path) -> tuple[Sequence[str], int]:
    """Image files below ``root`` (sorted, hidden ones skipped: the list training uses, from
    the same cache, :func:`dino.data.file_index.index_folder`) and the number of other files."""
    root = Path(root)
    if not root.exists():
        raise DinoError(f"{root} does not exist; pass a folder of images")
    if root.is_file():
        return [str(root)], 0
    index = index_folder(root, IMAGE_EXTENSIONS)
    return index.files, index.others


def check_folder(
    root: str | Path,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> CheckReport:
    """Decode every image file below ``root`` with ``workers`` processes (0: one per core).

    ``progress(n)`` is called as files are done. Raises :class:`DinoError` when ``root`` does
    not exist or holds no image file (as training does).
    """
    files, ignored = list_files(root)
    if not files:
        others = f" (only {ignored} files without an image extension)" if ignored else ""
        raise DinoError(
            f"no image files found in {root}{others}; training would refuse it too: put images "
            "(jpg, png, ...) in it or in subfolders"
        )
    report = CheckReport(Path(root), ignored=ignored)
    if workers <= 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    workers = max(1, min(workers, len(files) // 16 or 1))
    if workers == 1:
        results = map(check_file, files)
        _collect(report, results, progress)
    else:
        chunk = max(1, min(256, len(files) // (8 * workers)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            _collect(report, pool.map(check_file, files, chunksize=chunk), progress)
    report.bad.sort()
    return report


def _collect(
    report: CheckReport, results: Iterable[FileCheck], progress: Callable[[int], None] | None
) -> None:
    for r in results:
        report.checked += 1
        if r.error is not None:
            report.bad.append((r.path, r.error))
        else:
            if r.mode and r.mode != "RGB":
                report.converted[_MODE_NAMES.get(r.mode, r.mode)] += 1
            expected = _FORMAT_OF_EXTENSION.get(Path(r.path).suffix.lower())
            if r.format and expected and not _same_format(r.format, expected):
                report.mislabeled.append((r.path, r.format))
        if progress:
            progress(1)


def _same_format(actual: str, expected: str) -> bool:
    aliases = {"MPO": "JPEG"}  # multi-picture JPEGs from cameras
    return aliases.get(actual, actual) == aliases.get(expected, expected)
