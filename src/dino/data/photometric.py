"""The photometric half of the multi-crop views, batched on tensors: flip, color jitter (random
order of brightness, contrast, saturation, hue), grayscale, Gaussian blur, solarization and
normalization of rows of equal size (see :mod:`dino.data.tensor_aug` for how rows are processed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dino.data.crop_draws import ViewSpec
from dino.data.multicrop import blur_kernel_size

_GRAY = (0.299, 0.587, 0.114)
#: Bytes of rows processed together on CPUs (a chunk stays in the L2/L3 caches).
_CHUNK_BYTES = 1 << 21
#: The largest pixel value: the pipeline works in pixel units (0..255).
PIXEL_MAX = 255.0


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
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


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Channel ``n`` (5, 3, 1 for R, G, B) is ``v - v s clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6h) mod 6``: the six-sector table in closed form, without building the table
    (5x faster on CPUs)."""
    h, s, v = x.unbind(1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6.0 * h[:, None]) % 6.0
    return v[:, None] - (v * s)[:, None] * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotation through HSV and back (the reference for :func:`adjust_hue_`)."""
    hsv = rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(hsv)


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
    x.mul_(f).clamp_(0, PIXEL_MAX)


def _contrast_(x: torch.Tensor, f: torch.Tensor) -> None:
    """Blend with the mean luma of each row (torchvision's ``adjust_contrast``)."""
    means = x.mean((2, 3))
    if x.shape[1] == 3:
        means = means @ torch.tensor(_GRAY, device=x.device, dtype=x.dtype)
    x.mul_(f).add_((1 - f) * means.view(-1, 1, 1, 1)).clamp_(0, PIXEL_MAX)


def _saturation_(x: torch.Tensor, f: torch.Tensor, gray: torch.Tensor) -> None:
    """Blend with the luma of each pixel (torchvision's ``adjust_saturation``)."""
    g = _gray_into(x, gray).unsqueeze(1).mul_(1 - f)
    torch.addcmul(g, x, f, out=x).clamp_(0, PIXEL_MAX)


def adjust_hue_(x: torch.Tensor, shift: torch.Tensor, bufs: list[torch.Tensor]) -> None:
    """:func:`adjust_hue` in place on RGB rows ``x``, with six ``[n, H, W]`` scratch buffers.

    A hue rotation keeps each pixel's max and min channel: the closed form of
    :func:`hsv_to_rgb`, ``max - (max - min) clamp(min(k, 4 - k), 0, 1)`` with
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
#: :func:`blur_radii`): far below the float32 rounding of pixel units.
_BLUR_TAIL = 1e-7


def blur_kernels(sigma: np.ndarray, radius: int) -> np.ndarray:
    """``[n, 2 radius + 1]`` normalized Gaussian taps (torchvision's ``gaussian_blur``)."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    return (k / k.sum(1, keepdims=True)).astype(np.float32)


def blur_radii(sigma: np.ndarray, radius: int) -> np.ndarray:
    """Per row, the fewest taps each side that leave out of the ``radius`` kernel of
    :func:`blur_kernels` less than :data:`_BLUR_TAIL` of its weight: the same blur up to about
    ``255 * 4 * _BLUR_TAIL`` pixel units, with the small sigmas' kernels much shorter."""
    t = np.arange(radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)  # [n, radius + 1], one side
    total = k[:, 0] + 2 * k[:, 1:].sum(1)
    tail = 2 * np.cumsum(k[:, ::-1], 1)[:, ::-1] / total[:, None]  # weight of taps >= t
    kept = tail >= _BLUR_TAIL  # decreasing in t: radius r drops tail[r + 1]
    return kept[:, 1:].sum(1).astype(np.int64)


def blur_(x: torch.Tensor, rows: np.ndarray, sigma: np.ndarray, radius: int) -> None:
    """Blur rows ``rows`` of ``x`` in place with Gaussians of standard deviations ``sigma``
    (torchvision's ``gaussian_blur`` with ``2 radius + 1`` taps, reflect padding, up to the taps
    :func:`blur_radii` leaves out): separable, as two depthwise convolutions (one kernel per
    row and channel). The rows are gathered by kernel length, in chunks that stay in the
    caches (one convolution per chunk instead of one per run of consecutive rows)."""
    _, c, h, w = x.shape
    rows, sigma = np.asarray(rows), np.asarray(sigma, np.float64)
    radii = blur_radii(sigma, radius)
    order = np.argsort(radii, kind="stable")
    rows, sigma, radii = rows[order], sigma[order], radii[order]
    chunk = _chunk_rows(x, len(rows))
    bounds = np.flatnonzero(np.diff(radii, prepend=-1, append=radius + 1)).tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        r = int(radii[lo])
        if r == 0:  # a kernel of one tap: the identity
            continue
        taps = torch.from_numpy(blur_kernels(sigma[lo:hi], r)).to(x.device)
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
                    adjust_hue_(xs, f[:, 3], tmp)
        for a, z in _runs(p["gray"][perm], longest):
            g = _gray_into(x[a:z], scratch[0][: z - a])
            x[a:z].copy_(g.unsqueeze(1).expand(-1, 3, -1, -1))
        lo, hi = self.blur_sigma
        radius = (blur_kernel_size(hi, size) - 1) // 2
        blur_rows = np.flatnonzero(p["blur"][perm])
        if radius > 0 and len(blur_rows):
            blur_(x, blur_rows, p["sigma"][perm][blur_rows], radius)
        for a, z in _runs(p["solar"][perm], n):
            xs = x[a:z]
            torch.where(xs >= 128, PIXEL_MAX - xs, xs, out=xs)
        # normalization of pixel units, which puts the rows back in order
        scale = (1 / (PIXEL_MAX * self.std)).to(dev)
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
