"""The Fashion-MNIST files: Debian's ``dataset-fashion-mnist`` when installed, else torchvision's
download."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from dino.errors import DinoError

FASHION_MNIST_DIRS = [Path("/usr/share/datasets/fashion-mnist")]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_fashion_mnist(
    split: str = "train", root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 images [N, 28, 28], int64 labels [N])`` of a Fashion-MNIST split (60k train /
    10k test) from Debian's ``dataset-fashion-mnist`` files when installed, else downloaded once
    by torchvision into ``root`` (default ``~/.cache/dino``)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    for d in FASHION_MNIST_DIRS:
        img, lab = d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"
        if img.exists() and lab.exists():
            images = torch.from_numpy(_read_idx(img).copy())
            labels = torch.from_numpy(_read_idx(lab).astype(np.int64))
            break
    else:
        import torchvision

        root = Path(root or Path.home() / ".cache" / "dino")
        try:
            ds = torchvision.datasets.FashionMNIST(str(root), train=split == "train", download=True)
        except Exception as exc:  # no network, no package
            raise DinoError(
                "Fashion-MNIST is not installed and could not be downloaded "
                f"({exc}); install it with `apt-get install dataset-fashion-mnist`"
            ) from None
        images, labels = ds.data.clone(), ds.targets.clone()
    return images, labels
