"""A small labeled image folder that tests generate: 28-px gray pictures of 10 kinds of shapes
(filled and outlined disks, squares and triangles, plus and cross signs, bars, stars), each
roughly centered, at a random size, offset, rotation, stroke width and brightness on a noisy
background.

Written as ``root/train/<class>/*.png`` and ``root/val/<class>/*.png``, the layout of a user's
folder, so that ``dino train --data root`` trains on it and evaluates k-NN on its val split.

``python tests/helpers/shapes.py ROOT [TRAIN_PER_CLASS] [VAL_PER_CLASS]`` writes one.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = (
    "disk",
    "ring",
    "square",
    "square_outline",
    "triangle",
    "triangle_outline",
    "plus",
    "cross",
    "bars",
    "star",
)
SIZE = 28


def _polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(angle + 2 * math.pi * k / n),
            cy + r * math.sin(angle + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def draw_shape(kind: str, rng: np.random.Generator) -> Image.Image:
    """One 28x28 gray picture of ``kind``."""
    scale = 4  # drawn at 4x and downsampled: smooth edges
    s = SIZE * scale
    background = rng.uniform(0, 80)
    img = Image.new("L", (s, s), int(background))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.28, 0.42) * s  # a centered object filling most of the frame, as digits
    cx, cy = s / 2 + rng.uniform(-0.08, 0.08, 2) * s  # or garments in their 28-px datasets
    angle = rng.uniform(-0.35, 0.35)
    ink = int(rng.uniform(150, 255))
    width = int(rng.uniform(0.06, 0.12) * s)
    if kind in ("disk", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        d.ellipse(box, fill=ink if kind == "disk" else None, outline=ink, width=width)
    elif kind in ("square", "square_outline", "triangle", "triangle_outline"):
        n = 4 if kind.startswith("square") else 3
        start = angle + (math.pi / 4 if n == 4 else -math.pi / 2)
        pts = _polygon(cx, cy, r, n, start)
        if kind.endswith("outline"):
            d.line(pts + [pts[0]], fill=ink, width=width, joint="curve")
        else:
            d.polygon(pts, fill=ink)
    elif kind in ("plus", "cross"):
        base = angle + (0 if kind == "plus" else math.pi / 4)
        for a in (base, base + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=ink, width=width)
    elif kind == "bars":
        for offset in (-0.45 * r, 0.45 * r):
            dx, dy = r * math.cos(angle), r * math.sin(angle)
            ox, oy = -offset * math.sin(angle), offset * math.cos(angle)
            d.line(
                [(cx - dx + ox, cy - dy + oy), (cx + dx + ox, cy + dy + oy)], fill=ink, width=width
            )
    elif kind == "star":
        outer = _polygon(cx, cy, r, 5, angle - math.pi / 2)
        inner = _polygon(cx, cy, 0.42 * r, 5, angle - math.pi / 2 + math.pi / 5)
        d.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=ink)
    else:
        raise ValueError(kind)
    small = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float64)
    small = small + rng.normal(0, 12, small.shape)
    return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))


def write_shapes(root: str | Path, train_per_class: int, val_per_class: int, seed: int = 0) -> Path:
    """Write the folder (see the module docstring); returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_shape(kind, rng).save(folder / f"{i:05d}.png")
    return root


if __name__ == "__main__":
    args = sys.argv[1:]
    write_shapes(args[0], *(int(a) for a in args[1:3]))
