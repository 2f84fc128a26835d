"""Fashion-MNIST photos: scenes built like photos, for measuring what DINO segments.

The built-in dataset ``fashion-mnist-photos`` (docs/segmentation.md). It is drawn with the same
renderer as ``fashion-mnist-scenes`` (:func:`dino.data.scene_render.render_scenes`: background
regions, blotches, clutter, one garment, noise; exact masks), with what a photo has and those
scenes lack:

* **Backgrounds shared by all classes.** Every background region is of one of
  :data:`KINDS` (grass, sky, brick, ...: a palette and a texture each), drawn uniformly whatever
  the object is, so the same kinds of background recur in every class, as grass, sky and walls
  do in photos. Two scenes of the same kind look alike away from their objects.
* **Clutter from other classes.** 0-3 pieces of garments of *other* classes than the object's.
* **Objects anywhere, of varied size.** The garment is scaled to a side of 24-48 px (of 64)
  and put at a uniform position fully inside the frame, so a centred disc is no free answer.

Scene ``i`` of a split holds Fashion-MNIST image ``i`` of that split; its label is the object's
class; its background kind (the kind of the region holding most pixels) is kept for diagnosis.
Every scene comes from its own generator seeded with ``(seed, split, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from dino.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from dino.data.scene_render import (
    BLOTCH_GRID,
    SCENE_SIZE,
    SPLIT_CODE,
    TINT_TRIES,
    WINDOW_TRIES,
    SceneParams,
    Scenes,
    draw_scenes,
    hsv_to_rgb,
    noise,
    object_tint,
    place_fragments,
    shapes,
)
from dino.data.scene_render import colors as scene_colors

#: The name of the built-in dataset.
PHOTOS = "fashion-mnist-photos"


@dataclass(frozen=True)
class Kind:
    """A kind of background: colours drawn around ``hue`` (+- ``hue_spread``) with saturation
    and value in their ranges; a texture (``checker``, else stripes) of period ``period`` px
    mixed in with weight ``texture``."""

    name: str
    hue: float
    hue_spread: float
    saturation: tuple[float, float]
    value: tuple[float, float]
    checker: bool
    period: tuple[float, float]
    texture: tuple[float, float]


#: The pool every background region is drawn from, whatever the scene's class.
KINDS = (
    Kind("grass", 0.28, 0.05, (0.45, 0.85), (0.30, 0.65), False, (3, 5), (0.15, 0.35)),
    Kind("sky", 0.58, 0.04, (0.25, 0.60), (0.65, 0.95), False, (14, 24), (0.05, 0.15)),
    Kind("sand", 0.11, 0.03, (0.25, 0.50), (0.65, 0.90), False, (5, 9), (0.10, 0.25)),
    Kind("brick", 0.02, 0.03, (0.50, 0.80), (0.35, 0.60), True, (6, 10), (0.20, 0.40)),
    Kind("water", 0.53, 0.05, (0.55, 0.90), (0.30, 0.60), False, (6, 12), (0.15, 0.30)),
    Kind("wall", 0.10, 0.30, (0.05, 0.20), (0.55, 0.90), False, (16, 24), (0.05, 0.10)),
    Kind("road", 0.60, 0.20, (0.00, 0.10), (0.25, 0.45), False, (4, 8), (0.10, 0.25)),
    Kind("wood", 0.07, 0.02, (0.45, 0.75), (0.30, 0.55), False, (4, 7), (0.20, 0.40)),
    Kind("tiles", 0.50, 0.50, (0.05, 0.30), (0.55, 0.85), True, (10, 16), (0.15, 0.30)),
    Kind("foliage", 0.33, 0.06, (0.50, 0.90), (0.15, 0.40), True, (3, 6), (0.20, 0.40)),
    Kind("snow", 0.60, 0.05, (0.00, 0.10), (0.85, 1.00), False, (8, 16), (0.05, 0.15)),
    Kind("dusk", 0.85, 0.08, (0.30, 0.60), (0.30, 0.60), False, (18, 24), (0.05, 0.15)),
)
#: Fewest and most background regions per scene.
REGIONS = (1, 3)
#: Fewest and most pieces of clutter (garments of other classes) per scene.
CLUTTER = (0, 3)
#: Smallest and largest side of the object in pixels (from 28).
OBJECT_SIDE = (24.0, 48.0)


def _kind_colors(kinds: np.ndarray, u: np.ndarray) -> np.ndarray:
    """RGB colours ``[..., 3]`` of the kinds ``kinds [...]`` (indices into :data:`KINDS`) from
    uniforms ``u [..., 3]``."""
    table = np.array(
        [[k.hue, k.hue_spread, *k.saturation, *k.value] for k in KINDS], dtype=np.float64
    )[kinds]
    hue = (table[..., 0] + (2 * u[..., 0] - 1) * table[..., 1]) % 1.0
    sat = table[..., 2] + (table[..., 3] - table[..., 2]) * u[..., 1]
    val = table[..., 4] + (table[..., 5] - table[..., 4]) * u[..., 2]
    return hsv_to_rgb(np.stack([hue, sat, val], -1))


def background_kind(params: SceneParams, kinds: np.ndarray, size: int = SCENE_SIZE) -> np.ndarray:
    """The kind ``[B]`` of the background region holding most pixels of each scene, from the
    regions' kinds ``kinds [B, R]`` (:func:`photo_scene_params`)."""
    points = params.points
    pix = np.arange(size) + 0.5
    d = (pix[None, None, :, None] - points[..., 0, None, None]) ** 2 + (
        pix[None, None, None, :] - points[..., 1, None, None]
    ) ** 2  # [B, R, S, S]
    nearest = d.reshape(*d.shape[:2], -1).argmin(1)  # [B, S * S]
    counts = np.stack([(nearest == r).sum(1) for r in range(points.shape[1])], 1)
    return kinds[np.arange(len(kinds)), counts.argmax(1)]


def photo_scene_params(
    split: str,
    indices: list[int] | range | np.ndarray,
    sources: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 0,
    size: int = SCENE_SIZE,
) -> tuple[SceneParams, np.ndarray]:
    """The random choices of photo scenes ``indices`` of ``split`` and the kind of each of their
    background regions (``[B, R]``, indices into :data:`KINDS`; regions beyond a scene's count
    are absent, their points infinite). The object of scene ``i`` is ``sources[i]``;
    its clutter comes from images of other classes (``labels``: the classes of ``sources``)."""
    if split not in SPLIT_CODE:
        raise ValueError(f"split must be train or test, got {split!r}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    b, n_reg, n_frag = len(idx), REGIONS[1], CLUTTER[1]
    layout = {  # uniforms per scene, by use
        "regions": 1 + n_reg * (2 + 1 + 6 + 3 + 5),
        "bg": 3 * BLOTCH_GRID**2 + 2,
        "frag": n_frag * (1 + WINDOW_TRIES * 4 + 3 + 1 + 3),
        "obj": 4 + 3 * TINT_TRIES,
        "rest": 4,
    }
    total = sum(layout.values())
    u = np.stack(
        [np.random.default_rng([seed, 10 + SPLIT_CODE[split], int(i)]).random(total) for i in idx]
    ) if b else np.zeros((0, total))  # fmt: skip
    reg, bg, frag, obj, rest = np.split(u, np.cumsum(list(layout.values()))[:-1], axis=1)

    # background regions, each of a kind from the shared pool
    count_r = REGIONS[0] + np.minimum((reg[:, 0] * (n_reg - REGIONS[0] + 1)).astype(int), n_reg - 1)
    r = reg[:, 1:].reshape(b, n_reg, -1)
    points = r[..., 0:2] * size
    points[np.arange(n_reg)[None] >= count_r[:, None]] = np.inf
    kinds = np.minimum((r[..., 2] * len(KINDS)).astype(np.int64), len(KINDS) - 1)  # [B, R]
    colors = _kind_colors(kinds[..., None], r[..., 3:9].reshape(b, n_reg, 2, 3))
    texture_color = np.clip(_kind_colors(kinds, r[..., 9:12]) * 0.6, 0, 1)  # darker lines
    angle, texture_angle, phase, period_u, weight_u = (r[..., 12 + i] for i in range(5))
    spec = np.array([[*k.period, *k.texture, k.checker] for k in KINDS])[kinds]
    period = spec[..., 0] + (spec[..., 1] - spec[..., 0]) * period_u
    texture_weight = spec[..., 2] + (spec[..., 3] - spec[..., 2]) * weight_u
    # blotches: the low-frequency light of the scene, grey-ish and weak
    blotch_u = bg[:, : 3 * BLOTCH_GRID**2].reshape(b, -1, 3)
    blotches = hsv_to_rgb(np.stack([blotch_u[..., 0], 0.15 * blotch_u[..., 1],
                                    0.3 + 0.7 * blotch_u[..., 2]], -1))  # fmt: skip
    blotches = blotches.transpose(0, 2, 1).reshape(b, 3, BLOTCH_GRID, BLOTCH_GRID)
    blotch_weight = 0.05 + 0.15 * bg[:, -2]

    # clutter: windows of garments of other classes
    f = frag.reshape(b, n_frag, -1)
    own = labels[torch.from_numpy(idx)].numpy() if b else np.zeros(0, np.int64)
    pools = [np.flatnonzero(labels.numpy() != c) for c in range(len(FASHION_MNIST_CLASSES))]
    other = np.stack(
        [pools[c][np.minimum((f[i, :, 0] * len(pools[c])).astype(int), len(pools[c]) - 1)]
         for i, c in enumerate(own)]  # fmt: skip
    ) if b else np.zeros((0, n_frag), np.int64)  # fmt: skip
    fragments = place_fragments(sources, other, f[..., 1:], (0.9, 0.6), size)
    count = CLUTTER[0] + np.minimum(
        (bg[:, -1] * (n_frag - CLUTTER[0] + 1)).astype(np.int64), n_frag - CLUTTER[0]
    )
    fpresent = np.arange(n_frag)[None] < count[:, None]

    # the object: anywhere in the frame, of varied size; a tint away from the background's
    side = OBJECT_SIDE[0] + (OBJECT_SIDE[1] - OBJECT_SIDE[0]) * obj[:, 0]
    oy, ox = obj[:, 1] * (size - side), obj[:, 2] * (size - side)
    oflip = obj[:, 3] < 0.5
    otint = object_tint(scene_colors(obj[:, 4:].reshape(b, TINT_TRIES, 3), 0.35), colors, points)

    params = SceneParams(
        points=points,
        colors=colors,
        angle=2 * np.pi * angle,
        checker=spec[..., 4] > 0.5,
        period=period,
        texture_angle=np.pi * texture_angle,
        phase=2 * np.pi * phase,
        texture_color=texture_color,
        texture_weight=texture_weight,
        blotches=blotches,
        blotch_weight=blotch_weight,
        **shapes(other, fragments, fpresent, idx, (oy, ox, side, oflip, otint)),
        **noise(rest, size),
    )
    return params, kinds


def make_photo_scenes(
    split: str,
    indices: list[int] | range | None = None,
    seed: int = 0,
    size: int = SCENE_SIZE,
    chunk: int = 256,
) -> Scenes:
    """Photo scenes ``indices`` (default: all, one per Fashion-MNIST image) of ``split``, with
    each scene's background kind."""

    def params_of(part: list[int], sources: torch.Tensor, labels: torch.Tensor):
        params, kinds = photo_scene_params(split, part, sources, labels, seed, size)
        return params, background_kind(params, kinds, size)

    return draw_scenes(split, indices, params_of, PHOTOS, size, chunk)


@lru_cache(maxsize=2)
def fashion_mnist_photos(split: str, n: int = 0) -> Scenes:
    """The photo scenes of a split of the built-in dataset (seed 0; the first ``n`` when
    ``n > 0``), generated once per process."""
    total = len(read_fashion_mnist(split)[1])
    return make_photo_scenes(split, range(min(n, total)) if n > 0 else None)
