"""Reading image files for the frozen-feature evaluations: a list of paths as batches of
normalized tensors, the aspect-keeping resize of retrieval, a folder of images (with class
subfolders or not), and the check that a command got either a data set or two plain folders."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dino.data.datasets import IMAGE_EXTENSIONS, BadImage, load_image, loader_workers
from dino.errors import DinoError

Transform = Callable[[Image.Image], torch.Tensor]


class ImageList(Dataset):
    """Images of a list of paths through ``transform``; item ``(tensor, "")``, or
    ``(None, reason)`` for an unreadable file (reported by :func:`image_batches`)."""

    def __init__(self, paths: Sequence[str | Path], transform: Transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str]:
        try:
            img = load_image(self.paths[i])
        except BadImage as exc:
            return None, str(exc)
        return self.transform(img), ""


def image_batches(
    paths: Sequence[str | Path],
    transform: Transform,
    batch_size: int = 1,
    num_workers: int = 0,
    desc: str = "images",
) -> Iterator[torch.Tensor]:
    """Batches ``[B, 3, H, W]`` of the images in ``paths`` (in order); an unreadable image stops
    with a :class:`DinoError` naming it. ``batch_size`` > 1 needs a fixed-size transform."""
    loader = DataLoader(
        ImageList(paths, transform),
        batch_size=batch_size,
        num_workers=loader_workers(num_workers),
        collate_fn=list,
    )
    bar = tqdm(
        total=len(paths), desc=desc, unit="img", leave=False, disable=not sys.stderr.isatty()
    )
    try:
        for items in loader:
            for x, reason in items:
                if x is None:
                    raise DinoError(
                        f"cannot read the image {reason}; replace or remove it and run again"
                    )
            bar.update(len(items))
            yield torch.stack([x for x, _ in items])
    finally:
        bar.close()


def normalized_tensor(
    img: Image.Image, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """An RGB image as a normalized ``[3, H, W]`` float32 tensor."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class Thumbnail:
    """Shrink (never enlarge) so that both sides are at most ``imsize`` px, keeping the aspect
    (PIL's thumbnail, Lanczos), then normalize."""

    def __init__(self, imsize: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.imsize, self.mean, self.std = imsize, list(mean), list(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.copy()
        img.thumbnail((self.imsize, self.imsize), Image.Resampling.LANCZOS)
        return normalized_tensor(img, self.mean, self.std)


@dataclass
class ImageFolder:
    """The images below a folder (sorted) and their class (first-level subfolder) names;
    ``classes`` is None when the images do not all sit in class subfolders."""

    root: Path
    files: list[Path]
    classes: list[str] | None


def read_folder(path: str | Path, what: str) -> ImageFolder:
    """The images of a folder given as ``what`` (``--queries`` ...), recursively."""
    root = Path(path)
    if not root.is_dir():
        raise DinoError(f"{what} {root} is not a folder; pass a folder of images")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )
    if not files:
        raise DinoError(
            f"{what} {root} holds no image; put image files (jpg, png ...) in it or in subfolders"
        )
    rel = [p.relative_to(root).parts for p in files]
    classes = [parts[0] for parts in rel] if all(len(parts) >= 2 for parts in rel) else None
    return ImageFolder(root, files, classes)


def data_or_folders(
    data: object,
    folders: tuple[object, object],
    flags: tuple[str, str],
    layout: str,
    task: str,
) -> bool:
    """Whether the inputs are two plain folders (given as ``flags``) rather than a ``layout``
    data set given as ``--data``; raise :class:`DinoError` unless exactly one of the two is
    given, in full."""
    plain = any(f is not None for f in folders)
    first, second = flags
    if plain and data is not None:
        raise DinoError(f"pass either --data ({layout}) or {first} and {second}, not both")
    if plain and any(f is None for f in folders):
        raise DinoError(f"plain {task} needs both {first} and {second} folders")
    if not plain and data is None:
        raise DinoError(f"pass --data with a {layout} folder, or {first} and {second}")
    return plain
