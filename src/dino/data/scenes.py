"""Fashion-MNIST scenes: one garment on a cluttered background, with its exact mask.

The built-in dataset ``fashion-mnist-scenes`` measures what DINO's attention and patch features
segment (docs/segmentation.md). Scene ``i`` of a split holds Fashion-MNIST image ``i`` of that
split (train scenes from the train split, test scenes from the test split), so its class is the
object's class. Nothing is stored: every scene is drawn from its own random generator, seeded
with ``(seed, split, i)``, so a scene is the same whatever else is generated with it.

How a ``64 x 64`` RGB scene is made, back to front (all colours in 0..1):

1. **Background regions**: 2-4 random points split the frame into regions (each pixel belongs
   to its nearest point). Each region is a linear ramp between two random colours in a random
   direction (from one corner of the frame to the opposite one), with stripes (a sinusoid) or a
   checkerboard of random period 4-16 px, angle, phase and colour mixed in with weight 0.15-0.4.
2. **Blotches**: a 4x4 grid of random colours, bilinearly upsampled to the frame, mixed in over
   all regions with weight 0.15-0.4 (low-frequency noise).
3. **Fragments**: 4-7 pieces of *other* garments of the same split: an elliptical window of
   9-16 x 9-16 px of a 28 x 28 image, chosen (out of 8 tries) so that it holds 25-75 % ink (so it
   contains part of the garment's outline), scaled 1.1-1.8x, maybe mirrored, anywhere in the
   frame (up to 30 % outside), painted exactly like the object, each in its own colour.
4. **Object**: the whole garment, scaled to a side of 36-52 px, maybe mirrored, at a random
   position fully inside the frame.
5. **Noise**: Gaussian pixel noise (sigma 0.01-0.05) over the whole picture (a random window
   of a fixed 256 x 256 pool of Gaussian noise), then rounding to ``uint8``.

A shape (fragment or object) is painted where its bilinearly resampled intensity ``v`` (0..1)
exceeds :data:`INK`, in the colour ``tint * (0.3 + 0.7 v)``: the shading of the garment, tinted.
The object's mask is exactly the object's painted pixels (fragments lie behind the object).

Colours are drawn in HSV (hue uniform, saturation 0.2-1, value 0.25-1 for the background and
0.35-1 for shapes), so object and background brightness overlap; the object tint is redrawn (up
to 16 times) while it lies closer than 0.3 (RGB distance) to the mean gradient colour of the
regions, so that it stays visible.

Why several regions: with one background per scene, the background's colour and texture are
the same in every crop of a scene and unique to it, and DINO learned them instead of the object
(docs/segmentation.md).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from dino.data.fashion_mnist import read_fashion_mnist
from dino.data.scene_render import (
    BLOTCH_GRID,
    SCENE_SIZE,
    SPLIT_CODE,
    TINT_TRIES,
    WINDOW_TRIES,
    SceneParams,
    Scenes,
    colors,
    draw_scenes,
    noise,
    object_tint,
    place_fragments,
    shapes,
)

#: The name of the built-in dataset.
SCENES = "fashion-mnist-scenes"
#: Fewest and most fragments of other garments per scene.
FRAGMENTS = (4, 7)
#: Fewest and most background regions per scene.
REGIONS = (2, 4)
#: Smallest and largest side of the object in pixels (from 28).
OBJECT_SIDE = (36.0, 52.0)


def scene_params(
    split: str,
    indices: list[int] | range | np.ndarray,
    sources: torch.Tensor,
    seed: int = 0,
    size: int = SCENE_SIZE,
) -> SceneParams:
    """The random choices of scenes ``indices`` of ``split``, each from the generator seeded with
    ``(seed, split, index)``. The object of scene ``i`` is ``sources[i]`` (``uint8 [M, 28,
    28]``, the split's garments); its fragments come from the other images."""
    if split not in SPLIT_CODE:
        raise ValueError(f"split must be train or test, got {split!r}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    m = sources.shape[0]
    n_frag = FRAGMENTS[1]
    n_reg = REGIONS[1]
    layout = {  # uniforms per scene, by use
        "regions": 1 + n_reg * (2 + 6 + 3 + 6),
        "bg": 3 * BLOTCH_GRID**2 + 1,
        "frag": n_frag * (1 + 1 + WINDOW_TRIES * 4 + 3 + 1 + 3),
        "obj": 4 + 3 * TINT_TRIES,
        "rest": 4,
    }
    u = (
        np.stack(
            [
                np.random.default_rng([seed, SPLIT_CODE[split], int(i)]).random(
                    sum(layout.values())
                )
                for i in idx
            ]
        )
        if len(idx)
        else np.zeros((0, sum(layout.values())))
    )
    b = len(idx)
    parts = np.split(u, np.cumsum(list(layout.values()))[:-1], axis=1)
    reg, bg, frag, obj, rest = parts

    # background regions: [B, R, ...]
    count_r = REGIONS[0] + np.minimum(
        (reg[:, 0] * (n_reg - REGIONS[0] + 1)).astype(np.int64), n_reg - REGIONS[0]
    )
    r = reg[:, 1:].reshape(b, n_reg, -1)
    points = r[..., 0:2] * size
    points[np.arange(n_reg)[None] >= count_r[:, None]] = np.inf
    region_colors = colors(r[..., 2:8].reshape(b, n_reg, 2, 3), 0.25)
    texture_color = colors(r[..., 8:11], 0.25)
    angle, checker, period, texture_angle, phase, texture_weight = (
        r[..., 11 + i] for i in range(6)
    )
    blotches = colors(bg[:, : 3 * BLOTCH_GRID**2].reshape(b, -1, 3), 0.25)
    blotches = blotches.transpose(0, 2, 1).reshape(b, 3, BLOTCH_GRID, BLOTCH_GRID)
    blotch_weight = 0.15 + 0.25 * bg[:, -1]
    texture_weight = 0.15 + 0.25 * texture_weight

    # fragments: [B, F, ...]
    f = frag.reshape(b, n_frag, -1)
    other = np.minimum((f[..., 0] * (m - 1)).astype(np.int64), m - 2)
    other += other >= idx[:, None]  # never the object's own image
    fragments = place_fragments(sources, other, f[..., 2:], (1.1, 0.7), size)
    count = FRAGMENTS[0] + np.minimum(
        (f[:, 0, 1] * (n_frag - FRAGMENTS[0] + 1)).astype(np.int64), n_frag - FRAGMENTS[0]
    )
    fpresent = np.arange(n_frag)[None] < count[:, None]

    # the object
    side = OBJECT_SIDE[0] + (OBJECT_SIDE[1] - OBJECT_SIDE[0]) * obj[:, 0]
    oy, ox = obj[:, 1] * (size - side), obj[:, 2] * (size - side)
    oflip = obj[:, 3] < 0.5
    otint = object_tint(colors(obj[:, 4:].reshape(b, TINT_TRIES, 3), 0.35), region_colors, points)

    return SceneParams(
        points=points,
        colors=region_colors,
        angle=2 * np.pi * angle,
        checker=checker < 0.5,
        period=4 + 12 * period,
        texture_angle=np.pi * texture_angle,
        phase=2 * np.pi * phase,
        texture_color=texture_color,
        texture_weight=texture_weight,
        blotches=blotches,
        blotch_weight=blotch_weight,
        **shapes(other, fragments, fpresent, idx, (oy, ox, side, oflip, otint)),
        **noise(rest, size),
    )


def make_scenes(
    split: str,
    indices: list[int] | range | None = None,
    seed: int = 0,
    size: int = SCENE_SIZE,
    chunk: int = 256,
) -> Scenes:
    """Scenes ``indices`` (default: all, one per Fashion-MNIST image) of ``split``."""

    def params_of(part: list[int], sources: torch.Tensor, _labels: torch.Tensor):
        return scene_params(split, part, sources, seed, size), None

    return draw_scenes(split, indices, params_of, SCENES, size, chunk)


@lru_cache(maxsize=2)
def fashion_mnist_scenes(split: str, n: int = 0) -> Scenes:
    """The scenes of a split of the built-in dataset (seed 0; the first ``n`` when ``n > 0``),
    generated once per process."""
    total = len(read_fashion_mnist(split)[1])
    return make_scenes(split, range(min(n, total)) if n > 0 else None)
