"""Drawing scenes: one garment on a background, with its exact mask.

The renderer behind the built-in scene datasets (``fashion-mnist-scenes``,
``dino.data.scenes``, and ``fashion-mnist-photos``, ``dino.data.photo_scenes``): each module
draws a :class:`SceneParams` (everything random about a batch of scenes) from its own
distribution; :func:`render_scenes` paints it; :func:`draw_scenes` does both, a chunk at a
time, for a split of Fashion-MNIST.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from dino.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist

#: Side of a scene in pixels.
SCENE_SIZE = 64
#: Side of a source garment image in pixels.
SOURCE_SIZE = 28
#: Resampled garment intensity (0..1) above which a pixel of a shape is painted (and, for the
#: object, in the mask).
INK = 0.2
SPLIT_CODE = {"train": 1, "test": 2}
BLOTCH_GRID = 4
#: Draws of an object's tint, and of a fragment's window, before taking the last one.
TINT_TRIES = 16
WINDOW_TRIES = 8
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


def colors(u: np.ndarray, v_lo: float) -> np.ndarray:
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


def place_fragments(
    sources: torch.Tensor,
    other: np.ndarray,
    u: np.ndarray,
    scale: tuple[float, float],
    size: int,
) -> tuple[np.ndarray, ...]:
    """Windows and placements of fragments of the images ``other [B, F]``, from uniforms
    ``u [B, F, 4 * WINDOW_TRIES + 7]``: the first window (of ``WINDOW_TRIES``) holding 25-75 %
    ink, a scale ``scale[0] + scale[1] * u``, a position up to 30 % outside the frame, a flip
    and a tint. Returns ``(window, y, x, scale, flip, tint)``."""
    b, n = other.shape
    tries = u[..., : 4 * WINDOW_TRIES].reshape(b, n, WINDOW_TRIES, 4)
    h = 9 + np.minimum((tries[..., 0] * 8).astype(np.int64), 7)
    w = 9 + np.minimum((tries[..., 1] * 8).astype(np.int64), 7)
    top = 2 + np.floor(tries[..., 2] * (25 - h)).astype(np.int64)
    left = 2 + np.floor(tries[..., 3] * (25 - w)).astype(np.int64)
    wins = np.stack([top, left, h, w], -1)  # [B, F, T, 4]
    frac = window_ink(sources, other, wins)
    good = (frac >= 0.25) & (frac <= 0.75)
    pick = np.where(good.any(-1), good.argmax(-1), WINDOW_TRIES - 1)
    fwin = np.take_along_axis(wins, pick[..., None, None], axis=2)[:, :, 0]
    off = 4 * WINDOW_TRIES
    fscale = scale[0] + scale[1] * u[..., off]
    fh, fw = fwin[..., 2] * fscale, fwin[..., 3] * fscale
    fy = -0.3 * fh + u[..., off + 1] * (size - 0.4 * fh)
    fx = -0.3 * fw + u[..., off + 2] * (size - 0.4 * fw)
    return fwin, fy, fx, fscale, u[..., off + 3] < 0.5, colors(u[..., off + 4 : off + 7], 0.35)


def object_tint(tints: np.ndarray, region_colors: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The first of the candidate tints ``[B, TINT_TRIES, 3]`` at least 0.3 (RGB distance) from
    the mean gradient colour of the scene's regions (else the last one): ``[B, 3]``."""
    present = np.isfinite(points[..., 0])  # [B, R]
    mean_bg = (region_colors.mean(2) * present[..., None]).sum(1) / present.sum(1, keepdims=True)
    far = np.linalg.norm(tints - mean_bg[:, None], axis=-1) >= 0.3
    return tints[np.arange(len(tints)), np.where(far.any(-1), far.argmax(-1), TINT_TRIES - 1)]


def shapes(
    other: np.ndarray,
    fragments: tuple[np.ndarray, ...],
    present: np.ndarray,
    idx: np.ndarray,
    obj: tuple[np.ndarray, ...],
) -> dict[str, np.ndarray]:
    """The shape fields of :class:`SceneParams`: the fragments (:func:`place_fragments`, those
    ``present``), then the whole garment ``idx`` as the object, ``obj = (y, x, side, flip,
    tint)``."""
    fwin, fy, fx, fscale, fflip, ftint = fragments
    oy, ox, side, oflip, otint = obj
    b = len(idx)
    full = np.broadcast_to(np.array([0, 0, SOURCE_SIZE, SOURCE_SIZE]), (b, 1, 4))
    return {
        "source": np.concatenate([other, idx[:, None]], 1),
        "window": np.concatenate([fwin, full], 1),
        "y": np.concatenate([fy, oy[:, None]], 1),
        "x": np.concatenate([fx, ox[:, None]], 1),
        "scale": np.concatenate([fscale, (side / SOURCE_SIZE)[:, None]], 1),
        "flip": np.concatenate([fflip, oflip[:, None]], 1),
        "tint": np.concatenate([ftint, otint[:, None]], 1),
        "present": np.concatenate([present, np.ones((b, 1), dtype=bool)], 1),
    }


def noise(u: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """The noise fields of :class:`SceneParams` from uniforms ``u [B, 3]``: sigma 0.01-0.05 and
    the window of the noise pool."""
    return {
        "noise": 0.01 + 0.04 * u[:, 0],
        "noise_offset": np.floor(u[:, 1:3] * (NOISE_POOL - size + 1)).astype(np.int64),
    }


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


#: ``(indices, sources, labels) -> (params, background kinds or None)`` of a chunk of scenes.
ParamsOf = Callable[[list[int], torch.Tensor, torch.Tensor], tuple[SceneParams, np.ndarray | None]]


def draw_scenes(
    split: str,
    indices: list[int] | range | None,
    params_of: Callable[
        [list[int], torch.Tensor, torch.Tensor], tuple[SceneParams, np.ndarray | None]
    ],
    name: str,
    size: int = SCENE_SIZE,
    chunk: int = 256,
) -> Scenes:
    """Scenes ``indices`` (default: all, one per Fashion-MNIST image) of ``split``:
    ``params_of(indices, sources, labels)`` gives the :class:`SceneParams` of a chunk and its
    scenes' background kinds (or ``None``), which :func:`render_scenes` paints."""
    if split not in SPLIT_CODE:
        raise ValueError(f"split must be train or test, got {split!r}")
    sources, all_labels = read_fashion_mnist(split)
    n = len(sources)
    idx = list(range(n) if indices is None else indices)
    if any(not 0 <= i < n for i in idx):
        raise ValueError(f"scene indices must be in 0..{n - 1} for the {split} split")
    images = torch.empty(len(idx), 3, size, size, dtype=torch.uint8)
    masks = torch.empty(len(idx), size, size, dtype=torch.bool)
    kinds: list[np.ndarray] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads cost more than they save
    try:
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            params, kind = params_of(part, sources, all_labels)
            end = start + len(part)
            images[start:end], masks[start:end] = render_scenes(sources, params, size)
            if kind is not None:
                kinds.append(kind)
    finally:
        torch.set_num_threads(threads)
    labels = all_labels[torch.tensor(idx, dtype=torch.long)]
    background = torch.from_numpy(np.concatenate(kinds)) if kinds else None
    return Scenes(images, masks, labels, list(FASHION_MNIST_CLASSES), f"{name}/{split}", background)
