"""Batched multi-crop augmentation on tensors, on the training device.

The same per-view pipeline as :mod:`dino.data.multicrop` (docs/recipe.md, "Multi-crop views"):
RandomResizedCrop (bicubic, antialiased), horizontal flip, color jitter (random order of brightness,
contrast, saturation, hue), grayscale, Gaussian blur, solarization, normalization, but applied to a
whole batch at once.
Random parameters come from :mod:`dino.data.seeding`, one key per (seed, epoch, sample, view),
so a sample's views are the same whatever the batch it lands in.

Two halves: the geometric one (crop, resize) needs the original image; the photometric one
(:class:`Photometric`: flip, color jitter, grayscale, blur, solarization, normalization) only
the views of their final size. :class:`TensorMultiCrop` runs both on a batch of images held in
memory; for folders, DataLoader workers make the crops of each image
(:mod:`dino.data.file_crops`, from the same crop draws) and
:meth:`TensorMultiCrop.from_crops` runs the photometric half on the training device.

How the batch is processed (``benchmarks/input_pipeline.py`` measures it against the PIL path):

* views of the same size are one batch of rows (``views x samples``);
* crop + resize + flip: on CPUs, each row is one call of torch's antialiased ``uint8`` bicubic
  resize, the kernel torchvision runs in the PIL path (so the same pixels); on other devices,
  and for small images, two batched matrix products with the same filter weights
  (:func:`resize_weights`), in float;
* the rows are then sorted by their color-jitter order (24 permutations, or none), then
  grayscale, solarization and blur, so each operation runs in place on contiguous slices (in
  chunks that stay in the CPU caches) instead of boolean-mask copies; the blur is two
  depthwise convolutions (one kernel per row and channel);
* the pipeline works in pixel units (0..255) and folds the ``/ 255`` into the normalization,
  which also puts the rows back in sample order.

On CPUs the working buffers are kept between calls (allocating fresh pages costs more than most
of the passes over them).

Differences from the PIL path: it rounds or truncates to ``uint8`` after every operation, this
path only after the resize on CPUs (the PIL path's exact resized pixels) and never elsewhere
(float resize, within one ``uint8`` step); luma weights are 0.299/0.587/0.114 (torchvision's
0.2989/0.587/0.114).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dino.config import DataConfig
from dino.data.multicrop import blur_kernel_size
from dino.data.seeding import sample_keys, uniforms

_ATTEMPTS = 10
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
#: Uniforms per view and sample: the crop box's, then the photometric ones.
CROP_DRAWS = 4 * _ATTEMPTS
#: The uniform that flips a view horizontally (below 0.5): the first photometric one.
FLIP_DRAW = CROP_DRAWS
_N_DRAWS = CROP_DRAWS + 14
_GRAY = (0.299, 0.587, 0.114)
#: Largest ``C * size * H * (W + size)`` (multiply-adds per row) resized by matrix products on
#: CPUs; above it, one antialiased ``uint8`` resize call per row is faster.
_DENSE_RESIZE_MACS = 1 << 18
#: Bytes of rows processed together on CPUs (a chunk stays in the L2/L3 caches).
_CHUNK_BYTES = 1 << 21
_BOUND = 255.0


@dataclass(frozen=True)
class ViewSpec:
    """The augmentation of one view."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def view_specs(cfg: DataConfig) -> list[ViewSpec]:
    """The recipe's views of ``cfg``: two global views (their own blur and solarization
    probabilities), then ``local_crops`` local views."""
    glob = (cfg.global_size, tuple(cfg.global_scale))
    return [
        ViewSpec(*glob, cfg.blur_p[0], cfg.solarize_p[0]),
        ViewSpec(*glob, cfg.blur_p[1], cfg.solarize_p[1]),
    ] + [
        ViewSpec(cfg.local_size, tuple(cfg.local_scale), cfg.blur_p[2], cfg.solarize_p[2])
    ] * cfg.local_crops


def view_uniforms(seed: int, epoch: int, indices: np.ndarray, n_views: int) -> list[np.ndarray]:
    """Per view, the ``[B, 54]`` uniforms of each sample: :data:`CROP_DRAWS` for the crop box,
    then 14 for the photometric operations (stream ``v`` for view ``v``)."""
    return [uniforms(sample_keys(seed, epoch, indices, stream=v), _N_DRAWS) for v in range(n_views)]


def crop_boxes(u: np.ndarray, height: int, width: int, scale: tuple[float, float]) -> np.ndarray:
    """torchvision's RandomResizedCrop box sampling, vectorized: ``[B, 4]`` (top, left, h, w).

    ``u`` holds ``4 * 10`` uniforms per sample (area, log-ratio, top, left for each attempt);
    the first attempt that fits wins, else the central crop with the ratio clamped.
    """
    b = u.shape[0]
    area = height * width
    u = u.reshape(b, _ATTEMPTS, 4)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    ratio = np.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u[..., 1])
    w = np.round(np.sqrt(target * ratio))
    h = np.round(np.sqrt(target / ratio))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    top = np.floor(u[..., 2] * (height - h + 1))
    left = np.floor(u[..., 3] * (width - w + 1))
    first = np.argmax(ok, axis=1)
    rows = np.arange(b)
    boxes = np.stack([top[rows, first], left[rows, first], h[rows, first], w[rows, first]], 1)
    in_ratio = width / height
    if in_ratio < 3 / 4:
        fw, fh = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        fh, fw = height, round(height * (4 / 3))
    else:
        fw, fh = width, height
    fallback = np.array([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=np.float64)
    boxes[~ok.any(axis=1)] = fallback
    return boxes


def _bicubic_aa(x: np.ndarray) -> np.ndarray:
    """The cubic convolution kernel with a = -0.5 (PIL's, and torch's with ``antialias=True``)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_weights(start: np.ndarray, length: np.ndarray, size: int, in_size: int) -> np.ndarray:
    """``[B, size, in_size]`` float32 matrices resizing pixels ``start .. start + length`` of an
    axis of ``in_size`` pixels to ``size`` pixels: bicubic, antialiased when shrinking.

    The weights of torch's ``interpolate(mode="bicubic", antialias=True)`` (PIL's filter), which
    torchvision's ``resized_crop`` runs on the cropped image: the kernel is stretched by the
    shrink factor, cut at the crop's edges and renormalized.
    """
    start = np.asarray(start, np.float64)[:, None, None]
    length = np.asarray(length, np.float64)[:, None, None]
    scale = length / size
    stretch = np.maximum(scale, 1.0)
    support = 2.0 * stretch
    center = scale * (np.arange(size)[None, :, None] + 0.5)
    lo = np.maximum(np.trunc(center - support + 0.5), 0)
    hi = np.minimum(np.trunc(center + support + 0.5), length)
    j = np.arange(in_size)[None, None, :] - start  # input pixel, relative to the crop
    w = np.where((j >= lo) & (j < hi), _bicubic_aa((j - center + 0.5) / stretch), 0.0)
    total = w.sum(-1, keepdims=True)
    return (w / np.where(total != 0, total, 1.0)).astype(np.float32)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    dsafe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / dsafe, (maxc - g) / dsafe, (maxc - b) / dsafe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Channel ``n`` (5, 3, 1 for R, G, B) is ``v - v s clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6h) mod 6``: the six-sector table in closed form, without building the table
    (5x faster on CPUs)."""
    h, s, v = x.unbind(1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6.0 * h[:, None]) % 6.0
    return v[:, None] - (v * s)[:, None] * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotation through HSV and back (the reference for :func:`_adjust_hue_`)."""
    hsv = _rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(hsv)


class _Buffers:
    """Working memory reused between calls on CPUs (fresh pages cost more than a pass over
    them); elsewhere a plain allocation, which the device's caching allocator makes cheap."""

    def __init__(self) -> None:
        self._store: dict[str, torch.Tensor] = {}

    def get(
        self,
        name: str,
        shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """An uninitialized ``shape`` tensor; on CPUs, a view of the buffer called ``name``."""
        if device.type != "cpu":
            return torch.empty(shape, device=device, dtype=dtype)
        n = math.prod(shape)
        buf = self._store.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(n, dtype=dtype)
            self._store[name] = buf
        return buf[:n].view(shape)


def _gray_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Luma of the RGB rows ``x`` into ``out`` (``[n, H, W]``)."""
    torch.mul(x[:, 0], _GRAY[0], out=out)
    out.add_(x[:, 1], alpha=_GRAY[1])
    return out.add_(x[:, 2], alpha=_GRAY[2])


def _brightness_(x: torch.Tensor, f: torch.Tensor) -> None:
    x.mul_(f).clamp_(0, _BOUND)


def _contrast_(x: torch.Tensor, f: torch.Tensor) -> None:
    """Blend with the mean luma of each row (torchvision's ``adjust_contrast``)."""
    means = x.mean((2, 3))
    if x.shape[1] == 3:
        means = means @ torch.tensor(_GRAY, device=x.device, dtype=x.dtype)
    x.mul_(f).add_((1 - f) * means.view(-1, 1, 1, 1)).clamp_(0, _BOUND)


def _saturation_(x: torch.Tensor, f: torch.Tensor, gray: torch.Tensor) -> None:
    """Blend with the luma of each pixel (torchvision's ``adjust_saturation``)."""
    g = _gray_into(x, gray).unsqueeze(1).mul_(1 - f)
    torch.addcmul(g, x, f, out=x).clamp_(0, _BOUND)


def _adjust_hue_(x: torch.Tensor, shift: torch.Tensor, bufs: list[torch.Tensor]) -> None:
    """:func:`_adjust_hue` in place on RGB rows ``x``, with six ``[n, H, W]`` scratch buffers.

    A hue rotation keeps each pixel's max and min channel: the closed form of
    :func:`_hsv_to_rgb`, ``max - (max - min) clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6h) mod 6`` for channel ``n`` (5, 3, 1 for R, G, B), is
    ``min + (max - min) clamp(d - 1, 0, 1)`` with ``d`` the distance from ``k`` to 2 around the
    circle of length 6. With ``e = (6h - 3) mod 6``, ``d`` is ``|e - 4|`` for B, ``|e - 2|`` for
    G and ``min(e, 6 - e)`` for R. Selections are blends with 0/1 weights and the ``mod`` one
    conditional subtraction (``torch.where``, ``aminmax`` and ``remainder`` are 5-50x slower
    than plain arithmetic on CPUs).
    """
    r, g, b = x.unbind(1)
    at_r, minc, delta, at_g, e, t = bufs
    torch.amax(x, 1, out=at_r)
    torch.amin(x, 1, out=minc)
    torch.sub(at_r, minc, out=delta)
    torch.eq(at_r, g, out=at_g)
    torch.eq(at_r, r, out=at_r)
    # 6 h (max - min), by max channel: g - b (red), 2 delta + b - r (green), 4 delta + r - g (blue)
    torch.sub(r, g, out=e).add_(delta, alpha=4)
    torch.sub(b, r, out=t).add_(delta, alpha=2)
    torch.lerp(e, t, at_g, out=e)
    torch.lerp(e, torch.sub(g, b, out=t), at_r, out=e)
    # 6 h is in [-1, 5], so 6 h - 3 + 6 shift is in [low, low + 6] with low = 6 shift - 4: an
    # offset of a multiple of 6 brings low into [0, 6), and one subtraction ends in [0, 6)
    low = 6 * shift - 4
    e.div_(delta.clamp_(min=1e-12)).add_((6 * shift - 3 - 6 * torch.floor(low / 6)).view(-1, 1, 1))
    e.sub_(torch.ge(e, 6, out=t), alpha=6)
    for c in (2, 1, 0):
        if c == 0:
            d = torch.minimum(e, torch.sub(e, 6, out=t).neg_(), out=t)
        else:
            d = torch.sub(e, 4 if c == 2 else 2, out=t).abs_()
        torch.addcmul(minc, delta, d.sub_(1).clamp_(0, 1), out=x[:, c])


#: Largest weight of the Gaussian taps a blur leaves out of the recipe's kernel (see
#: :func:`_blur_radii`): far below the float32 rounding of pixel units.
_BLUR_TAIL = 1e-7


def _blur_kernels(sigma: np.ndarray, radius: int) -> np.ndarray:
    """``[n, 2 radius + 1]`` normalized Gaussian taps (torchvision's ``gaussian_blur``)."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    return (k / k.sum(1, keepdims=True)).astype(np.float32)


def _blur_radii(sigma: np.ndarray, radius: int) -> np.ndarray:
    """Per row, the fewest taps each side that leave out of the ``radius`` kernel of
    :func:`_blur_kernels` less than :data:`_BLUR_TAIL` of its weight: the same blur up to about
    ``255 * 4 * _BLUR_TAIL`` pixel units, with the small sigmas' kernels much shorter."""
    t = np.arange(radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)  # [n, radius + 1], one side
    total = k[:, 0] + 2 * k[:, 1:].sum(1)
    tail = 2 * np.cumsum(k[:, ::-1], 1)[:, ::-1] / total[:, None]  # weight of taps >= t
    kept = tail >= _BLUR_TAIL  # decreasing in t: radius r drops tail[r + 1]
    return kept[:, 1:].sum(1).astype(np.int64)


def _blur_(x: torch.Tensor, rows: np.ndarray, sigma: np.ndarray, radius: int) -> None:
    """Blur rows ``rows`` of ``x`` in place with Gaussians of standard deviations ``sigma``
    (torchvision's ``gaussian_blur`` with ``2 radius + 1`` taps, reflect padding, up to the taps
    :func:`_blur_radii` leaves out): separable, as two depthwise convolutions (one kernel per
    row and channel). The rows are gathered by kernel length, in chunks that stay in the
    caches (one convolution per chunk instead of one per run of consecutive rows)."""
    _, c, h, w = x.shape
    rows, sigma = np.asarray(rows), np.asarray(sigma, np.float64)
    radii = _blur_radii(sigma, radius)
    order = np.argsort(radii, kind="stable")
    rows, sigma, radii = rows[order], sigma[order], radii[order]
    chunk = _chunk_rows(x, len(rows))
    bounds = np.flatnonzero(np.diff(radii, prepend=-1, append=radius + 1)).tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        r = int(radii[lo])
        if r == 0:  # a kernel of one tap: the identity
            continue
        taps = torch.from_numpy(_blur_kernels(sigma[lo:hi], r)).to(x.device)
        taps = taps.repeat_interleave(c, 0)  # one kernel per (row, channel)
        for a in range(lo, hi, chunk):
            z = min(a + chunk, hi)
            m = z - a
            k = taps[(a - lo) * c : (z - lo) * c]
            run = rows[a:z]
            if run[-1] - run[0] == m - 1:  # increasing (a stable sort of sorted rows): contiguous
                src, idx = x[int(run[0]) : int(run[0]) + m], None
            else:
                idx = torch.from_numpy(run).to(x.device)
                src = x.index_select(0, idx)
            # channels-last: oneDNN's depthwise kernel vectorizes over the channels (~1.1x)
            y = F.pad(src.reshape(1, m * c, h, w), (r, r, 0, 0), mode="reflect")
            y = F.conv2d(_channels_last(y), k.view(m * c, 1, 1, 2 * r + 1), groups=m * c)
            y = F.pad(y, (0, 0, r, r), mode="reflect")
            y = F.conv2d(_channels_last(y), k.view(m * c, 1, 2 * r + 1, 1), groups=m * c)
            y = y.view(m, c, h, w)
            if idx is None:
                src.copy_(y)
            else:
                x.index_copy_(0, idx, y)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _chunk_rows(x: torch.Tensor, n: int) -> int:
    """How many rows of ``x`` to process at once: :data:`_CHUNK_BYTES` on CPUs, all elsewhere."""
    if x.device.type != "cpu":
        return max(n, 1)
    return max(1, _CHUNK_BYTES // (x[0].numel() * x.element_size()))


def _runs(flags: np.ndarray, chunk: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the runs of True in a 1-D boolean array, cut every ``chunk`` rows."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))).tolist()
    return [
        (i, min(i + chunk, z))
        for a, z in zip(edges[0::2], edges[1::2], strict=True)
        for i in range(a, z, chunk)
    ]


@dataclass
class _Rows:
    """The rows (views x samples, view-major) of one view size on their way through
    :class:`Photometric`: their random parameters ``p``, the processing order ``perm`` (row
    ``perm[k]`` is processed at position ``k``; ``pos`` is its inverse) and the working tensor
    ``x`` (pixel units, rows in processing order)."""

    p: dict[str, np.ndarray]
    perm: np.ndarray
    pos: np.ndarray
    x: torch.Tensor


class Photometric:
    """The photometric half of the views, batched: flip, color jitter (random order of
    brightness, contrast, saturation, hue), grayscale, Gaussian blur, solarization and
    normalization of rows of equal size, from the 14 photometric uniforms of each row.

    Rows are processed sorted by (jitter order, grayscale, solarization, blur), so that each
    operation runs on contiguous slices, and put back in order by the normalization.
    """

    def __init__(
        self,
        brightness: float,
        contrast: float,
        saturation: float,
        hue: float,
        color_jitter_p: float,
        grayscale_p: float,
        blur_sigma: tuple[float, float],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.jitter = (brightness, contrast, saturation, hue)
        self.color_jitter_p = color_jitter_p
        self.grayscale_p = grayscale_p
        self.blur_sigma = blur_sigma
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.bufs = _Buffers()

    def draws(self, d: np.ndarray, specs: list[ViewSpec], channels: int) -> dict[str, np.ndarray]:
        """The random parameters of each row from its 14 uniforms ``d`` (torchvision's ranges)."""
        b = len(d) // len(specs)
        factors = []
        for i, s in enumerate(self.jitter[:3]):  # brightness, contrast, saturation
            lo = max(0.0, 1 - s)
            factors.append(lo + (1 + s - lo) * d[:, 2 + i])
        factors.append(self.jitter[3] * (2 * d[:, 5] - 1))  # hue
        order = np.argsort(d[:, 6:10], axis=1)  # a uniform random permutation per row
        ops = 4 if channels == 3 else 2  # saturation and hue are the identity on one channel
        seq = order if ops == 4 else order[order < ops].reshape(-1, ops)
        jitter = d[:, 1] < self.color_jitter_p
        lo, hi = self.blur_sigma
        return {
            "flip": d[:, 0] < 0.5,
            "factors": np.stack(factors, 1).astype(np.float32),
            "seq": seq,
            "key": np.where(jitter, seq @ ops ** np.arange(ops)[::-1], -1),
            "gray": (d[:, 10] < self.grayscale_p) & (channels == 3),
            "blur": d[:, 11] < np.repeat([s.blur_p for s in specs], b),
            "sigma": lo + (hi - lo) * d[:, 12],
            "solar": d[:, 13] < np.repeat([s.solarize_p for s in specs], b),
        }

    def rows(
        self, d: np.ndarray, specs: list[ViewSpec], channels: int, device: torch.device
    ) -> _Rows:
        """The parameters, processing order and (uninitialized) working tensor of the rows
        whose photometric uniforms are ``d`` (view-major)."""
        p = self.draws(d, specs, channels)
        n, size = len(d), specs[0].size
        perm = np.lexsort((p["blur"], p["solar"], p["gray"], p["key"]))
        pos = np.empty(n, np.int64)
        pos[perm] = np.arange(n)
        x = self.bufs.get("work", (n, channels, size, size), device)
        return _Rows(p, perm, pos, x)

    def __call__(self, rows: _Rows) -> torch.Tensor:
        """Color jitter, grayscale, blur, solarization and normalization of ``rows.x`` (already
        cropped, resized and flipped): ``[n, 3, size, size]`` normalized, in row order."""
        p, perm, pos, x = rows.p, rows.perm, rows.pos, rows.x
        n, c, size, dev = x.shape[0], x.shape[1], x.shape[-1], x.device
        chunk = _chunk_rows(x, n)
        key = p["key"][perm]
        runs = []  # (start, stop, operations) of the rows with the same jitter order
        for a, z in _runs(key >= 0, n):
            starts = np.flatnonzero(np.diff(key[a:z], prepend=-2)).tolist()
            for s, t in zip(starts, starts[1:] + [z - a], strict=True):
                ops = p["seq"][perm[a + s]].tolist()
                runs += [(i, min(i + chunk, a + t), ops) for i in range(a + s, a + t, chunk)]
        longest = max((z - a for a, z, _ in runs), default=min(chunk, n))
        scratch = [self.bufs.get(f"scratch{i}", (longest, size, size), dev) for i in range(6)]
        fac = torch.from_numpy(p["factors"][perm]).to(dev)
        for a, z, ops in runs:
            xs, f, tmp = x[a:z], fac[a:z], [s[: z - a] for s in scratch]
            for op in ops:
                fo = f[:, op].view(-1, 1, 1, 1)
                if op == 0:
                    _brightness_(xs, fo)
                elif op == 1:
                    _contrast_(xs, fo)
                elif op == 2:
                    _saturation_(xs, fo, tmp[0])
                else:
                    _adjust_hue_(xs, f[:, 3], tmp)
        for a, z in _runs(p["gray"][perm], longest):
            g = _gray_into(x[a:z], scratch[0][: z - a])
            x[a:z].copy_(g.unsqueeze(1).expand(-1, 3, -1, -1))
        lo, hi = self.blur_sigma
        radius = (blur_kernel_size(hi, size) - 1) // 2
        blur_rows = np.flatnonzero(p["blur"][perm])
        if radius > 0 and len(blur_rows):
            _blur_(x, blur_rows, p["sigma"][perm][blur_rows], radius)
        for a, z in _runs(p["solar"][perm], n):
            xs = x[a:z]
            torch.where(xs >= 128, _BOUND - xs, xs, out=xs)
        # normalization of pixel units, which puts the rows back in order
        scale = (1 / (_BOUND * self.std)).to(dev)
        bias = (-self.mean / self.std).to(dev)
        out = torch.empty(n, 3, size, size, device=dev)
        if dev.type == "cpu":  # one pass, row by row (a gather, then a pass: 1.5x the time)
            scale, bias = scale[0], bias[0]
            for row, k in enumerate(pos.tolist()):
                torch.addcmul(bias, x[k], scale, out=out[row])
            return out
        index = torch.from_numpy(pos).to(dev)
        if c == 3:
            return torch.addcmul(bias, torch.index_select(x, 0, index, out=out), scale, out=out)
        return torch.addcmul(bias, x.index_select(0, index), scale, out=out)


class TensorMultiCrop:
    """Batched multi-crop: ``uint8 [B, C, H, W]`` images (C = 1 or 3) -> list of normalized views.

    Args:
        views: one :class:`ViewSpec` per view, global views first.
        brightness, contrast, saturation, hue: color jitter strengths.
        color_jitter_p, grayscale_p: probabilities of the jitter and of grayscale.
        blur_sigma: (min, max) sigma of the Gaussian blur, in pixels of the output view.
        mean, std: normalization (RGB).

    The views of the same size are slices of one tensor. On CPUs the instance keeps its working
    buffers (about the size of the views of one call) between calls.
    """

    def __init__(
        self,
        views: list[ViewSpec],
        brightness: float,
        contrast: float,
        saturation: float,
        hue: float,
        color_jitter_p: float,
        grayscale_p: float,
        blur_sigma: tuple[float, float],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.views = views
        self.photometric = Photometric(
            brightness, contrast, saturation, hue, color_jitter_p, grayscale_p, blur_sigma,
            mean, std,
        )  # fmt: skip
        self._bufs = self.photometric.bufs

    @classmethod
    def from_config(cls, cfg: DataConfig) -> TensorMultiCrop:
        """The recipe's views and photometric parameters of ``cfg``."""
        return cls(
            view_specs(cfg), cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue,
            cfg.color_jitter_p, cfg.grayscale_p, tuple(cfg.blur_sigma), tuple(cfg.mean),
            tuple(cfg.std),
        )  # fmt: skip

    def size_groups(self) -> list[list[int]]:
        """The views of each size (in order of first appearance): one batch of rows each."""
        sizes = dict.fromkeys(spec.size for spec in self.views)
        return [[v for v, spec in enumerate(self.views) if spec.size == s] for s in sizes]

    def __call__(
        self, images: torch.Tensor, indices: np.ndarray, epoch: int, seed: int
    ) -> list[torch.Tensor]:
        b = images.shape[0]
        u = view_uniforms(seed, epoch, indices, len(self.views))
        views: dict[int, torch.Tensor] = {}
        source: dict[str, torch.Tensor] = {}
        for group in self.size_groups():
            x = self._views(images, [self.views[v] for v in group], [u[v] for v in group], source)
            views.update((v, x[j * b : (j + 1) * b]) for j, v in enumerate(group))
        return [views[v] for v in range(len(self.views))]

    def from_crops(
        self, crops: list[torch.Tensor], indices: np.ndarray, epoch: int, seed: int
    ) -> list[torch.Tensor]:
        """The photometric half only, on crops made elsewhere (per image, in DataLoader
        workers: :class:`dino.data.file_crops.FileCrops`, from the same draws as
        :meth:`__call__`).

        ``crops[g]``: ``uint8 [B, len(group), C, size, size]`` (sample-major, already flipped
        by their :data:`FLIP_DRAW`: a flip is cheapest on the small ``uint8`` crop, where it is
        made), the views of size group ``g`` of :meth:`size_groups`, on the training device.
        Returns the list of normalized views, as :meth:`__call__` does.
        """
        b = len(indices)
        u = view_uniforms(seed, epoch, indices, len(self.views))
        views: dict[int, torch.Tensor] = {}
        for group, g in zip(self.size_groups(), crops, strict=True):
            specs = [self.views[v] for v in group]
            _, m, c, size, _ = g.shape
            d = np.concatenate([u[v][:, CROP_DRAWS:] for v in group])
            rows = self.photometric.rows(d, specs, c, g.device)
            # row r = j * b + i (view-major) is crop [i, j] (sample-major)
            r = rows.perm
            source = torch.from_numpy((r % b) * m + r // b).to(g.device)
            rows.x.copy_(g.reshape(b * m, c, size, size).index_select(0, source))
            x = self.photometric(rows)
            views.update((v, x[j * b : (j + 1) * b]) for j, v in enumerate(group))
        return [views[v] for v in range(len(self.views))]

    def _views(
        self,
        images: torch.Tensor,
        specs: list[ViewSpec],
        u: list[np.ndarray],
        source: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The views of the same size, view-major: ``[len(specs) * B, 3, size, size]``."""
        _, c, height, width = images.shape
        boxes = np.concatenate(
            [
                crop_boxes(v[:, :CROP_DRAWS], height, width, s.scale)
                for v, s in zip(u, specs, strict=True)
            ]
        )
        d = np.concatenate([v[:, CROP_DRAWS:] for v in u])
        rows = self.photometric.rows(d, specs, c, images.device)
        self._resize(images, boxes, rows.p["flip"], rows.pos, rows.x, source)
        return self.photometric(rows)

    def _resize(
        self,
        images: torch.Tensor,
        boxes: np.ndarray,
        flip: np.ndarray,
        pos: np.ndarray,
        x: torch.Tensor,
        source: dict[str, torch.Tensor],
    ) -> None:
        """Crop, resize and flip row ``r`` (view-major) of ``images`` into row ``pos[r]`` of
        ``x``, in pixel units."""
        b, c, height, width = images.shape
        size = x.shape[-1]
        if images.device.type != "cpu" or c * size * height * (width + size) <= _DENSE_RESIZE_MACS:
            if "float" not in source:
                source["float"] = images.float()
            img = source["float"]
            for v in range(len(boxes) // b):
                rows = slice(v * b, (v + 1) * b)
                top, left, h, w = boxes[rows].T
                ry = torch.from_numpy(resize_weights(top, h, size, height)).to(img.device)
                rx = resize_weights(left, w, size, width)
                rx[flip[rows]] = rx[flip[rows], ::-1]
                rxt = torch.from_numpy(rx).to(img.device).transpose(1, 2)
                y = torch.matmul(ry[:, None], torch.matmul(img, rxt[:, None]))
                x.index_copy_(0, torch.from_numpy(pos[rows]).to(x.device), y.clamp_(0, _BOUND))
            return
        if "channels_last" not in source:  # the layout of torch's fast uint8 kernel
            img = images
            if not images.is_contiguous(memory_format=torch.channels_last):
                img = self._bufs.get("source", (b, height, width, c), images.device, images.dtype)
                torch.stack(images.unbind(1), dim=-1, out=img)  # 2x faster than copy_ here
                img = img.permute(0, 3, 1, 2)
            source["channels_last"] = img
        img = source["channels_last"]
        for r, (top, left, h, w) in enumerate(boxes.astype(np.int64).tolist()):
            s = r % b
            y = F.interpolate(
                img[s : s + 1, :, top : top + h, left : left + w],
                size=(size, size),
                mode="bicubic",
                antialias=True,
            )
            x[pos[r] : pos[r] + 1].copy_(y.flip(-1) if flip[r] else y)
