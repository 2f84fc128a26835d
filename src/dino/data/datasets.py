"""Datasets: any folder of images, and the built-in Fashion-MNIST and Fashion-MNIST scenes.

Two kinds of dataset feed training:

* :class:`TensorImages`: a whole dataset as one ``uint8 [N, C, H, W]`` tensor (the built-in
  Fashion-MNIST, and its scenes of :mod:`dino.data.scenes`); it is augmented in batches on the
  training device (:mod:`tensor_aug`).
* :class:`ImageFiles`: image files of a folder, decoded with PIL in DataLoader workers. Its items
  are addressed by ``(epoch, index)`` so that each sample's augmentation is seeded from
  (seed, epoch, index) alone. An unreadable file is replaced by the next readable one and
  reported, never fatal (:func:`dino.data.check.check_folder` finds them all up front).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dino.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from dino.data.file_index import FileList, index_folder
from dino.data.photo_scenes import PHOTOS, fashion_mnist_photos
from dino.data.scenes import SCENES, Scenes, fashion_mnist_scenes
from dino.data.seeding import sample_seed
from dino.devices import launch_env
from dino.errors import DinoError

BUILTIN = ("fashion-mnist", SCENES, PHOTOS)
#: The built-in datasets whose images come with object masks (``dino segment --score``).
SCENE_DATASETS = (SCENES, PHOTOS)

IMAGE_EXTENSIONS = {
    ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
}


@dataclass
class TensorImages:
    """A dataset held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str]
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]


def fashion_mnist(split: str = "train", root: str | Path | None = None) -> TensorImages:
    """Fashion-MNIST (60k train / 10k test, 28x28 gray) as a :class:`TensorImages`
    (:func:`dino.data.fashion_mnist.read_fashion_mnist` says where it comes from)."""
    images, labels = read_fashion_mnist(split, root)
    return TensorImages(
        images[:, None], labels, list(FASHION_MNIST_CLASSES), f"fashion-mnist/{split}"
    )


def image_paths(items: list[str] | list[Path]) -> list[Path]:
    """The image files that ``items`` name: files as given, folders searched recursively (sorted).

    Raises:
        DinoError: an item that does not exist, or no image file at all.
    """
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise DinoError(f"image {p} does not exist; pass image files or folders of images")
    if not files:
        raise DinoError(f"no image files in {' '.join(str(i) for i in items)}")
    return files


def builtin_split(name: str, split: str, n: int = 0) -> TensorImages:
    """The ``train`` or ``test`` split of a built-in dataset (:data:`BUILTIN`); the scenes are
    generated (only the first ``n`` when ``n > 0``)."""
    if name in SCENE_DATASETS:
        scenes = builtin_scenes(name, split, n)
        return TensorImages(scenes.images, scenes.labels, scenes.classes, scenes.name)
    if name == "fashion-mnist":
        return fashion_mnist(split)
    raise DinoError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN)}")


def builtin_scenes(name: str, split: str, n: int = 0) -> Scenes:
    """The ``train`` or ``test`` scenes of a built-in scene dataset (:data:`SCENE_DATASETS`),
    with their masks (only the first ``n`` when ``n > 0``)."""
    return (fashion_mnist_photos if name == PHOTOS else fashion_mnist_scenes)(split, n)


class BadImage(Exception):
    """A file that PIL cannot decode into an image."""


#: JPEG decoding can scale by these factors (DCT scaling: PIL's ``draft``), almost for free.
_JPEG_REDUCTIONS = (8, 4, 2, 1)


@contextmanager
def opened_image(path: str | Path) -> Iterator[Image.Image]:
    """``path`` opened by PIL: its size and format known, its pixels not decoded yet.

    Every failure, also inside the ``with`` block (decoding with :func:`to_rgb`), becomes a
    :class:`BadImage` that names the file: empty, truncated or not an image (whatever the
    extension says), or with absurd dimensions (more than twice PIL's
    ``Image.MAX_IMAGE_PIXELS``, which is how decompression bombs and corrupt headers look).
    """
    try:
        if os.path.getsize(path) == 0:
            raise BadImage(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # to_rgb decides
            im_file = Image.open(path)
        with im_file as im:
            yield im
    except BadImage as exc:
        if str(exc).startswith(f"{path}: "):
            raise
        raise BadImage(f"{path}: {exc}") from None
    except UnidentifiedImageError:
        raise BadImage(f"{path}: not an image in a format PIL reads") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"{path}: absurd dimensions: {exc}") from None
    except Exception as exc:  # decoders raise many types
        raise BadImage(f"{path}: {exc or type(exc).__name__}") from None


def jpeg_reduction(im: Image.Image, allowed: float) -> int:
    """The factor (1, 2, 4 or 8) by which :func:`to_rgb` decodes ``im``: the largest that is at
    most ``allowed`` (how much smaller the caller can use the image), and at least what keeps a
    huge JPEG within ``Image.MAX_IMAGE_PIXELS``; 1 for other formats."""
    w, h = im.size
    if im.format not in ("JPEG", "MPO"):
        return 1
    limit = Image.MAX_IMAGE_PIXELS
    for s in _JPEG_REDUCTIONS:
        if s <= allowed and s <= min(w, h):
            break
    if limit:
        for need in _JPEG_REDUCTIONS[::-1]:
            if math.ceil(w / need) * math.ceil(h / need) <= limit:
                return max(s, need)
    return s


def to_rgb(im: Image.Image, allowed_reduction: float = 1.0) -> Image.Image:
    """Decode an image of :func:`opened_image` into 8-bit RGB (16-bit, CMYK, palette, RGBA and
    gray are converted; transparency over white).

    A JPEG is decoded at 1/2, 1/4 or 1/8 of its size (:func:`jpeg_reduction`) when
    ``allowed_reduction`` permits it, and as much as needed to stay within PIL's
    ``Image.MAX_IMAGE_PIXELS`` (a 10 000 x 10 000 photo is decoded at 5 000 x 5 000 at most);
    any other image with more pixels than that is rejected (:class:`BadImage`).
    """
    w, h = im.size
    s = jpeg_reduction(im, allowed_reduction)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and math.ceil(w / s) * math.ceil(h / s) > limit:
        raise BadImage(
            f"absurd dimensions: {w} x {h} pixels, more than PIL's limit of {limit} "
            "(Image.MAX_IMAGE_PIXELS)"
        )
    if s > 1:
        im.draft(None, (w // s, h // s))
    im.load()
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    if min(rgb.size) < 1:
        raise BadImage("empty image")
    return rgb


def load_image(path: str | Path) -> Image.Image:
    """Open any image PIL reads and convert it to 8-bit RGB (:func:`opened_image`,
    :func:`to_rgb`); raises :class:`BadImage` for files that cannot be decoded."""
    with opened_image(path) as im:
        return to_rgb(im)  # decoded: usable after the file is closed


def data_hint(data: str) -> str:
    """How to fix a ``--data`` that names no folder: the built-in dataset it resembles, if any."""
    import difflib

    close = difflib.get_close_matches(data.lower().replace("_", "-"), BUILTIN, n=1, cutoff=0.75)
    if close:
        return f"did you mean the built-in dataset --data {close[0]}?"
    return f"pass --data with a folder of images or a built-in dataset ({', '.join(BUILTIN)})"


def scan_folder(
    root: str | Path, index_dir: str | Path | None = None
) -> tuple[FileList, np.ndarray, list[str]]:
    """All image files below ``root`` (sorted; hidden files and folders skipped) with labels:
    the first-level folder is the class when every image sits in one, else the dataset is flat
    and labels are -1. The list is cached (:func:`dino.data.file_index.index_folder`: beside
    ``root`` when its parent is writable, else in ``index_dir``) and listed again only when a
    folder below ``root`` changed."""
    root = Path(root)
    if not root.exists():
        raise DinoError(f"data folder {root} does not exist; {data_hint(str(root))}")
    if not root.is_dir():
        raise DinoError(f"--data {root} is not a folder; point it at a folder of images")
    index = index_folder(root, IMAGE_EXTENSIONS, index_dir)
    if not len(index.files):
        raise DinoError(
            f"no image files found in {root}; put images (jpg, png, ...) in it or in subfolders"
        )
    return index.files, index.labels, index.classes


class ImageFiles(torch.utils.data.Dataset):
    """Images of a folder. ``ds[(epoch, i)]`` returns ``(transform(image), label, bad)``
    with torch's generator seeded from (seed, epoch, i); ``ds[i]`` uses epoch 0.

    A file that cannot be decoded is replaced by the next decodable file; ``bad`` reports it so
    the training loop can count and list it: ``""`` when the file was readable, else the JSON
    text of ``[[path, reason], ...]`` (see :func:`decode_bad`).

    ``files`` is a :class:`~dino.data.file_index.FileList` (one buffer, not one object per
    file) and ``labels`` an ``int64`` array; ``index_dir`` is where the folder's file list is
    cached when it cannot be beside the folder (:func:`scan_folder`).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], object] | None = None,
        seed: int = 0,
        files: tuple[FileList | list[str], np.ndarray | list[int], list[str]] | None = None,
        index_dir: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        paths, labels, self.classes = files or scan_folder(root, index_dir)
        self.files = paths if isinstance(paths, FileList) else FileList.from_paths(root, paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int, decode: Callable[[str], object]) -> tuple[object, int, str]:
        """``(decode(path), label, bad)`` of file ``index``, or of the next file ``decode``
        does not reject with :class:`BadImage` (``bad`` lists the rejected ones)."""
        bad: list[tuple[str, str]] = []
        for attempt in range(len(self.files)):
            i = (index + attempt) % len(self.files)
            path = self.files[i]
            try:
                out = decode(path)
                break
            except BadImage as exc:
                bad.append((path, str(exc).removeprefix(f"{path}: ")))
                if len(bad) > 32:
                    raise DinoError(
                        f"more than 32 consecutive unreadable images near {self.files[index]}; "
                        "run `dino check-data` on the folder"
                    ) from None
        else:
            raise DinoError(f"no readable image in {self.root}")
        return out, int(self.labels[i]), json.dumps(bad) if bad else ""

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[object, int, str]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.transform is None:
            return self.read(index, load_image)
        return self.read(index, lambda path: self._transform(load_image(path), epoch, index))

    def _transform(self, img: Image.Image, epoch: int, index: int) -> object:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(img)  # type: ignore[misc]


def decode_bad(reports: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """``(path, reason)`` of every unreadable file in a batch of :class:`ImageFiles` reports."""
    return [(str(p), str(r)) for text in reports if text for p, r in json.loads(text)]


def loader_workers(requested: int) -> int:
    """DataLoader workers per process: ``requested`` when it is 0 or more (``--num-workers``),
    else (-1) this machine's share: all its cores but one for the process itself, divided among
    the processes torchrun started on it, at most 8."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_world = launch_env().local_world
    return max(1, min(8, (cores or 1) // max(local_world, 1) - 1))


@dataclass
class TrainingData:
    """What a run trains on, and the labeled bank/query pair for k-NN if there is one."""

    train: TensorImages | ImageFiles
    knn_bank: TensorImages | ImageFiles | None
    knn_query: TensorImages | ImageFiles | None


def _head(ds: TensorImages | ImageFiles | None, n: int) -> TensorImages | ImageFiles | None:
    """The first ``n`` images of ``ds`` (all when ``n`` is 0)."""
    if ds is None or n <= 0 or n >= len(ds):
        return ds
    if isinstance(ds, TensorImages):
        labels = None if ds.labels is None else ds.labels[:n]
        return TensorImages(ds.images[:n], labels, ds.classes, ds.name)
    files = (ds.files[:n], ds.labels[:n], ds.classes)
    return ImageFiles(ds.root, ds.transform, ds.seed, files=files)


def shard(ds: TensorImages | ImageFiles, rank: int, world: int) -> TensorImages | ImageFiles:
    """Samples ``rank, rank + world, rank + 2 world, ...`` of ``ds``: process ``rank``'s share
    of an evaluation."""
    if world == 1:
        return ds
    if isinstance(ds, TensorImages):
        labels = None if ds.labels is None else ds.labels[rank::world]
        return TensorImages(ds.images[rank::world], labels, ds.classes, ds.name)
    files = (ds.files[rank::world], ds.labels[rank::world], ds.classes)
    return ImageFiles(ds.root, ds.transform, ds.seed, files=files)


def open_training_data(
    data: str, subset: int = 0, index_dir: str | Path | None = None
) -> TrainingData:
    """Resolve ``--data`` (see :func:`_open`), keeping the first ``subset`` images if > 0.
    ``index_dir`` (the run folder) keeps the file lists of folders whose parent is read-only
    (:func:`scan_folder`)."""
    d = _open(data, index_dir, subset)
    return TrainingData(
        _head(d.train, subset), _head(d.knn_bank, subset), _head(d.knn_query, subset)
    )


def _open(data: str, index_dir: str | Path | None = None, subset: int = 0) -> TrainingData:
    """Resolve ``--data``: a built-in name, or a folder. A folder with ``train/`` and ``val/``
    (or ``test/``) class subfolders trains on ``train``; k-NN goes from ``train`` to ``val``."""
    if data == "fashion-mnist":
        return TrainingData(fashion_mnist("train"), fashion_mnist("train"), fashion_mnist("test"))
    if data in BUILTIN:  # generated in memory once: the training set is also the k-NN bank
        train = builtin_split(data, "train", subset)
        return TrainingData(train, train, builtin_split(data, "test", subset))
    root = Path(data)
    train_dir = root / "train"
    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if train_dir.is_dir() and val_dir is not None:
        train = ImageFiles(train_dir, index_dir=index_dir)
        val = ImageFiles(val_dir, index_dir=index_dir)
        if train.classes and val.classes:
            missing = set(val.classes) - set(train.classes)
            if missing:
                raise DinoError(
                    f"classes {sorted(missing)} of {val_dir} are not in {train_dir}; "
                    "every validation class needs training images"
                )
            remap = np.array([train.classes.index(c) for c in val.classes], dtype=np.int64)
            val.labels = remap[val.labels]
            val.classes = train.classes
            return TrainingData(train, train, val)
        return TrainingData(train, None, None)
    return TrainingData(ImageFiles(root, index_dir=index_dir), None, None)
