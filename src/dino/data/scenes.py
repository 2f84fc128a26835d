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

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from dino.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist

#: The name of the built-in dataset.
SCENES = "fashion-mnist-scenes"
#: Side of a scene in pixels.
SCENE_SIZE = 64
#: Side of a source garment image in pixels.
SOURCE_SIZE = 28
#: Resampled garment intensity (0..1) above which a pixel of a shape is painted (and, for the
#: object, in the mask).
INK = 0.2
#: Fewest and most fragments of other garments per scene.
FRAGMENTS = (4, 7)
#: Fewest and most background regions per scene.
REGIONS = (2, 4)
#: Smallest and largest side of the object in pixels (from 28).
OBJECT_SIDE = (36.0, 52.0)
SPLIT_CODE = {"train": 1, "test": 2}
BLOTCH_GRID = 4
_TINT_TRIES = 16
_WINDOW_TRIES = 8
NOISE_POOL = 256


@lru_cache(maxsize=1)
def _noise_pool() -> torch.Tensor:
    """``[3, 256, 256]`` standard Gaussian noise (fixed); a scene's noise is a window of it."""
    gen = np.random.default_rng(20210429)
    return torch.from_numpy(gen.standard_normal((3, NOISE_POOL, NOISE_POOL), np.float32))


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """HSV -> RGB for arrays ``[..., 3]`` of values in 0..1."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    n = np.array([5.0, 3.0, 1.0])
    k = (n + 6.0 * h[..., None]) % 6.0
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _colors(u: np.ndarray, v_lo: float) -> np.ndarray:
    """Colours ``[..., 3]`` from uniforms ``[..., 3]``: hue, saturation 0.2-1, value v_lo-1."""
    hsv = np.stack([u[..., 0], 0.2 + 0.8 * u[..., 1], v_lo + (1 - v_lo) * u[..., 2]], -1)
    return hsv_to_rgb(hsv)


@dataclass
class SceneParams:
    """Everything random about a batch of ``B`` scenes; region ``r`` of a scene's background is
    the set of pixels nearest to its ``points[r]``; shape ``j`` of a scene is fragment ``j`` for
    ``j < L - 1`` and the object for ``j = L - 1`` (see the module docstring).

    A shape's window ``(top, left, height, width)`` of the 28 x 28 source image ``source`` is
    scaled by ``scale`` and its top-left corner put at canvas pixel ``(y, x)``.
    """

    points: np.ndarray  # [B, R, 2] (y, x) seeds of the background regions (inf: no region)
    colors: np.ndarray  # [B, R, 2, 3] gradient end colours of each region
    angle: np.ndarray  # [B, R] gradient direction (radians)
    checker: np.ndarray  # [B, R] bool: checkerboard, else stripes
    period: np.ndarray  # [B, R] texture period (px)
    texture_angle: np.ndarray  # [B, R]
    phase: np.ndarray  # [B, R]
    texture_color: np.ndarray  # [B, R, 3]
    texture_weight: np.ndarray  # [B, R]
    blotches: np.ndarray  # [B, 3, 4, 4]
    blotch_weight: np.ndarray  # [B]
    source: np.ndarray  # [B, L] int: index of the source image of each shape
    window: np.ndarray  # [B, L, 4] int
    y: np.ndarray  # [B, L]
    x: np.ndarray  # [B, L]
    scale: np.ndarray  # [B, L]
    flip: np.ndarray  # [B, L] bool
    tint: np.ndarray  # [B, L, 3]
    present: np.ndarray  # [B, L] bool: fragments beyond a scene's count are absent
    noise: np.ndarray  # [B] sigma
    noise_offset: np.ndarray  # [B, 2] int: where the scene's noise is cut from the pool

    def __len__(self) -> int:
        return len(self.angle)


def window_ink(sources: torch.Tensor, src: np.ndarray, win: np.ndarray) -> np.ndarray:
    """Fraction of ink (intensity > INK) in windows ``win [..., T, 4]`` of the sources
    ``src [...]`` (one source for the ``T`` windows of a row)."""
    ink = sources[torch.from_numpy(src.reshape(-1))].numpy() > INK * 255
    integral = np.zeros((ink.shape[0], SOURCE_SIZE + 1, SOURCE_SIZE + 1))
    integral[:, 1:, 1:] = ink.cumsum(1).cumsum(2)
    integral = integral.reshape(*src.shape, SOURCE_SIZE + 1, SOURCE_SIZE + 1)
    rows = np.indices(src.shape)
    t, left, h, w = (win[..., i] for i in range(4))

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return integral[(*(r[..., None] for r in rows), y, x)]

    total = at(t + h, left + w) - at(t, left + w) - at(t + h, left) + at(t, left)
    return total / (h * w)


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
        "frag": n_frag * (1 + 1 + _WINDOW_TRIES * 4 + 3 + 1 + 3),
        "obj": 4 + 3 * _TINT_TRIES,
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
    colors = _colors(r[..., 2:8].reshape(b, n_reg, 2, 3), 0.25)
    texture_color = _colors(r[..., 8:11], 0.25)
    angle, checker, period, texture_angle, phase, texture_weight = (
        r[..., 11 + i] for i in range(6)
    )
    blotches = _colors(bg[:, : 3 * BLOTCH_GRID**2].reshape(b, -1, 3), 0.25)
    blotches = blotches.transpose(0, 2, 1).reshape(b, 3, BLOTCH_GRID, BLOTCH_GRID)
    blotch_weight = 0.15 + 0.25 * bg[:, -1]
    texture_weight = 0.15 + 0.25 * texture_weight

    # fragments: [B, F, ...]
    f = frag.reshape(b, n_frag, -1)
    other = np.minimum((f[..., 0] * (m - 1)).astype(np.int64), m - 2)
    other += other >= idx[:, None]  # never the object's own image
    tries = f[..., 2 : 2 + 4 * _WINDOW_TRIES].reshape(b, n_frag, _WINDOW_TRIES, 4)
    h = 9 + np.minimum((tries[..., 0] * 8).astype(np.int64), 7)
    w = 9 + np.minimum((tries[..., 1] * 8).astype(np.int64), 7)
    top = 2 + np.floor(tries[..., 2] * (25 - h)).astype(np.int64)
    left = 2 + np.floor(tries[..., 3] * (25 - w)).astype(np.int64)
    wins = np.stack([top, left, h, w], -1)  # [B, F, T, 4]
    frac = window_ink(sources, other, wins)
    good = (frac >= 0.25) & (frac <= 0.75)
    pick = np.where(good.any(-1), good.argmax(-1), _WINDOW_TRIES - 1)
    fwin = np.take_along_axis(wins, pick[..., None, None], axis=2)[:, :, 0]
    off = 2 + 4 * _WINDOW_TRIES
    fscale = 1.1 + 0.7 * f[..., off]
    fh, fw = fwin[..., 2] * fscale, fwin[..., 3] * fscale
    fy = -0.3 * fh + f[..., off + 1] * (size - 0.4 * fh)
    fx = -0.3 * fw + f[..., off + 2] * (size - 0.4 * fw)
    fflip = f[..., off + 3] < 0.5
    ftint = _colors(f[..., off + 4 : off + 7], 0.35)
    count = FRAGMENTS[0] + np.minimum(
        (f[:, 0, 1] * (n_frag - FRAGMENTS[0] + 1)).astype(np.int64), n_frag - FRAGMENTS[0]
    )
    fpresent = np.arange(n_frag)[None] < count[:, None]

    # the object
    side = OBJECT_SIDE[0] + (OBJECT_SIDE[1] - OBJECT_SIDE[0]) * obj[:, 0]
    oy, ox = obj[:, 1] * (size - side), obj[:, 2] * (size - side)
    oflip = obj[:, 3] < 0.5
    tints = _colors(obj[:, 4:].reshape(b, _TINT_TRIES, 3), 0.35)
    present = np.isfinite(points[..., 0])  # [B, R]
    mean_bg = (colors.mean(2) * present[..., None]).sum(1) / present.sum(1, keepdims=True)
    far = np.linalg.norm(tints - mean_bg[:, None], axis=-1) >= 0.3
    otint = tints[np.arange(b), np.where(far.any(-1), far.argmax(-1), _TINT_TRIES - 1)]
    full = np.broadcast_to(np.array([0, 0, SOURCE_SIZE, SOURCE_SIZE]), (b, 1, 4))

    return SceneParams(
        points=points,
        colors=colors,
        angle=2 * np.pi * angle,
        checker=checker < 0.5,
        period=4 + 12 * period,
        texture_angle=np.pi * texture_angle,
        phase=2 * np.pi * phase,
        texture_color=texture_color,
        texture_weight=texture_weight,
        blotches=blotches,
        blotch_weight=blotch_weight,
        source=np.concatenate([other, idx[:, None]], 1),
        window=np.concatenate([fwin, full], 1),
        y=np.concatenate([fy, oy[:, None]], 1),
        x=np.concatenate([fx, ox[:, None]], 1),
        scale=np.concatenate([fscale, (side / SOURCE_SIZE)[:, None]], 1),
        flip=np.concatenate([fflip, oflip[:, None]], 1),
        tint=np.concatenate([ftint, otint[:, None]], 1),
        present=np.concatenate([fpresent, np.ones((b, 1), dtype=bool)], 1),
        noise=0.01 + 0.04 * rest[:, 0],
        noise_offset=np.floor(rest[:, 1:3] * (NOISE_POOL - size + 1)).astype(np.int64),
    )


def _sample_grid(p: SceneParams, size: int) -> torch.Tensor:
    """``grid_sample`` grids ``[B * L, size, size, 2]`` (``align_corners=False`` units) mapping
    canvas pixels to the source coordinates of each shape's window."""
    b, n = p.source.shape
    top, left, h, w = (p.window[..., i].astype(np.float64) for i in range(4))
    # canvas edge coordinate X (0..size) <-> c = 2 X / size - 1; the source coordinate is
    # x' = left + (X - x) / scale (mirrored: left + w - (X - x) / scale), and 2 x' / 28 - 1.
    edges = (np.arange(size) + 0.5)[None, None]
    sy = top[..., None] + (edges - p.y[..., None]) / p.scale[..., None]
    sx = (edges - p.x[..., None]) / p.scale[..., None]
    sx = np.where(p.flip[..., None], left[..., None] + w[..., None] - sx, left[..., None] + sx)
    gy = torch.from_numpy(2 * sy / SOURCE_SIZE - 1).float().reshape(b * n, size, 1)
    gx = torch.from_numpy(2 * sx / SOURCE_SIZE - 1).float().reshape(b * n, 1, size)
    return torch.stack(torch.broadcast_tensors(gx, gy), -1)


def _windowed_sources(p: SceneParams, sources: torch.Tensor) -> torch.Tensor:
    """``[B * L, 1, 28, 28]`` intensities (0..1) of each shape's source, zero outside its
    window (an ellipse inscribed in it for fragments)."""
    b, n = p.source.shape
    r = torch.arange(SOURCE_SIZE, dtype=torch.float32) + 0.5
    win = torch.from_numpy(p.window.reshape(-1, 4)).float()
    top, left, h, w = (win[:, i, None, None] for i in range(4))
    dy = (r[None, :, None] - top - h / 2) / (h / 2)
    dx = (r[None, None, :] - left - w / 2) / (w / 2)
    fragment = torch.ones(b, n, dtype=torch.bool)
    fragment[:, -1] = False
    ellipse = dy**2 + dx**2 <= 1
    box = (dy.abs() <= 1) & (dx.abs() <= 1)
    keep = torch.where(fragment.reshape(-1, 1, 1), ellipse, box)
    img = sources[torch.from_numpy(p.source.reshape(-1))].float() / 255.0
    return (img * keep)[:, None]


def render_scenes(
    sources: torch.Tensor, params: SceneParams, size: int = SCENE_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw scenes: ``uint8 [B, 3, size, size]`` images and ``bool [B, size, size]`` object masks.

    ``sources`` are the ``uint8 [M, 28, 28]`` garment images the shapes' ``source`` indexes.
    Each scene depends on its own parameters only, never on the others of the batch.
    """
    p = params
    b, n = p.source.shape

    def t(a: np.ndarray) -> torch.Tensor:
        """A per-scene parameter as a float tensor broadcastable against ``[B, 3, S, S]``."""
        x = torch.from_numpy(np.asarray(a, dtype=np.float64)).float()
        return x.reshape(b, *x.shape[1:], *([1] * (4 - x.dim())))

    pix = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = pix[:, None], pix[None, :]

    def along(angle: torch.Tensor) -> torch.Tensor:
        return torch.cos(angle) * xs + torch.sin(angle) * ys

    # each region: a gradient from one corner of its direction to the opposite one, and a
    # texture (stripes or checkerboard, 0..1) mixed in; [B, R, 3, S, S]
    def r(a: np.ndarray) -> torch.Tensor:
        """A per-region parameter ``[B, R, ...]`` broadcastable against ``[B, R, 3, S, S]``."""
        x = torch.from_numpy(np.asarray(a, dtype=np.float64)).float()
        return x.reshape(*x.shape, *([1] * (5 - x.dim())))

    d = along(r(p.angle))
    lo = d.amin(dim=(-2, -1), keepdim=True)
    ramp = (d - lo) / (d.amax(dim=(-2, -1), keepdim=True) - lo)
    freq = 2 * np.pi / r(p.period)
    u = along(r(p.texture_angle)) * freq + r(p.phase)
    v = along(r(p.texture_angle) + np.pi / 2) * freq
    su = torch.sin(u)
    pattern = torch.where(r(p.checker) > 0, (su * torch.sin(v) > 0).float(), 0.5 + 0.5 * su)
    tw = r(p.texture_weight)
    c0 = torch.from_numpy(p.colors[:, :, 0]).float()[..., None, None]
    c1 = torch.from_numpy(p.colors[:, :, 1]).float()[..., None, None]
    tc = torch.from_numpy(p.texture_color).float()[..., None, None]
    layers = (c0 + (c1 - c0) * ramp) * (1 - tw) + tc * pattern * tw
    # the region of each pixel: its nearest point (Voronoi cells)
    pts = torch.from_numpy(p.points).float()  # [B, R, 2]
    dist = (ys - pts[..., 0, None, None]) ** 2 + (xs - pts[..., 1, None, None]) ** 2
    region = dist.argmin(1)  # [B, S, S]
    index = region[:, None, None].expand(-1, 1, 3, -1, -1)
    background = layers.gather(1, index)[:, 0]
    # blotches: low-frequency colour noise over all regions
    grid = torch.from_numpy(p.blotches).float().reshape(b, 3, BLOTCH_GRID, BLOTCH_GRID)
    canvas = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    bw = t(p.blotch_weight)
    canvas.mul_(bw).add_(background * (1 - bw))
    # shapes, back to front (fragments, then the object): each pixel shows the last shape whose
    # ink exceeds INK there, in its tint shaded by the ink
    ink = F.grid_sample(
        _windowed_sources(p, sources),
        _sample_grid(p, size),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    ).reshape(b, n, size, size)
    painted = (ink > INK) & torch.from_numpy(p.present)[..., None, None]
    layer = torch.arange(1, n + 1, dtype=torch.uint8).view(1, n, 1, 1)
    top = (painted * layer).amax(1, keepdim=True).long()  # [B, 1, S, S], 0: background
    shade = 0.3 + 0.7 * ink.gather(1, (top - 1).clamp_min(0))
    tint = torch.cat([torch.zeros(b, 1, 3), torch.from_numpy(p.tint).float()], 1)
    color = tint.gather(1, top.view(b, -1, 1).expand(-1, -1, 3)).transpose(1, 2)
    color = color.reshape(b, 3, size, size) * shade
    canvas = torch.where(top > 0, color, canvas)
    masks = painted[:, -1].clone()
    # noise: a window of a fixed pool of Gaussian noise
    pool = _noise_pool()
    for i, (y, x) in enumerate(p.noise_offset.tolist()):
        canvas[i].add_(pool[:, y : y + size, x : x + size], alpha=float(p.noise[i]))
    images = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, masks


@dataclass
class Scenes:
    """Scenes of a split: ``images`` uint8 ``[N, 3, S, S]``, ``masks`` bool ``[N, S, S]``,
    ``labels`` int64 ``[N]`` (the object's Fashion-MNIST class)."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    #: int64 ``[N]``: each scene's background kind, where its dataset has kinds
    background: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


def make_scenes(
    split: str,
    indices: list[int] | range | None = None,
    seed: int = 0,
    size: int = SCENE_SIZE,
    chunk: int = 256,
) -> Scenes:
    """Scenes ``indices`` (default: all, one per Fashion-MNIST image) of ``split``."""
    sources, all_labels = read_fashion_mnist(split)
    n = len(sources)
    idx = list(range(n) if indices is None else indices)
    if any(not 0 <= i < n for i in idx):
        raise ValueError(f"scene indices must be in 0..{n - 1} for the {split} split")
    images = torch.empty(len(idx), 3, size, size, dtype=torch.uint8)
    masks = torch.empty(len(idx), size, size, dtype=torch.bool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads cost more than they save
    try:
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            params = scene_params(split, part, sources, seed, size)
            end = start + len(part)
            images[start:end], masks[start:end] = render_scenes(sources, params, size)
    finally:
        torch.set_num_threads(threads)
    labels = all_labels[torch.tensor(idx, dtype=torch.long)]
    return Scenes(images, masks, labels, list(FASHION_MNIST_CLASSES), f"{SCENES}/{split}")


@lru_cache(maxsize=2)
def fashion_mnist_scenes(split: str, n: int = 0) -> Scenes:
    """The scenes of a split of the built-in dataset (seed 0; the first ``n`` when ``n > 0``),
    generated once per process."""
    total = len(read_fashion_mnist(split)[1])
    return make_scenes(split, range(min(n, total)) if n > 0 else None)
