"""Two-class labeled image folders that tests generate, on a noisy background:

* ``stripes``: horizontal against vertical stripes at a random phase and brightness, so that no
  single pixel tells the class;
* ``levels``: dim against bright noise (overlapping ranges of pixel values): what a [CLS]
  token tells apart from the start, so that a few steps of fine-tuning learn it.

Written as ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (the layout of
``--data``); ``root/train`` alone is a ``dino classify --bank``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

KINDS = {"stripes": ("horizontal", "vertical"), "levels": ("dim", "bright")}


def picture(kind: str, rng: np.random.Generator, size: int = 16, mode: str = "L") -> Image.Image:
    """One picture of class ``kind`` (one of the :data:`KINDS`' classes)."""
    if kind in KINDS["levels"]:
        low = 60 if kind == "dim" else 110
        a = rng.integers(low, low + 90, (size, size)).astype(np.float64)
        return Image.fromarray(a.astype(np.uint8), "L").convert(mode)
    a = rng.integers(0, 50, (size, size)).astype(np.float64)
    on = (np.arange(size) + rng.integers(0, 4)) % 4 < 2  # stripes 2 px wide, 2 px apart
    region = (on, slice(None)) if kind == "horizontal" else (slice(None), on)
    a[region] += rng.uniform(120, 200)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert(mode)


def write_folder(
    root: str | Path,
    pair: str = "stripes",
    train: int = 12,
    val: int = 8,
    size: int = 16,
    mode: str = "L",
    seed: int = 0,
) -> Path:
    """``train`` and ``val`` images of each class of ``pair`` below ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for kind in KINDS[pair]:
            folder = Path(root) / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                picture(kind, rng, size, mode).save(folder / f"{i:03d}.png")
    return Path(root)
