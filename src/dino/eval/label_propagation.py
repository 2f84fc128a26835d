"""Label propagation between video frames, the maths of the paper's video segmentation (after
Jabri et al., 2020): each patch of a new frame takes the labels of its most similar patches in the
context frames, near its position, weighted by ``softmax(sim / T)``; masks go to and from the
patch grid."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dino.errors import DinoError

#: Temperature of the label votes' weights ``exp(sim / T)`` (fixed in the reference).
TEMPERATURE = 0.1
#: The reference rounds the longer side of the working frame down to a multiple of this.
_LONG_SIDE_STEP = 64

#: A function from a normalized frame ``[3, H, W]`` to its patch features ``[h, w, D]``.
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TrackSettings:
    """The propagation's parameters (defaults: the paper's)."""

    n_last_frames: int = 7
    topk: int = 5
    size_mask_neighborhood: int = 12
    size: int = 480

    def check(self) -> None:
        if self.n_last_frames < 0:
            raise DinoError(f"--n-last-frames must be 0 or more, got {self.n_last_frames}")
        if self.topk < 1:
            raise DinoError(f"--topk must be at least 1, got {self.topk}")
        if self.size_mask_neighborhood < 0:
            raise DinoError(
                f"--size-mask-neighborhood must be 0 (no restriction) or more, got "
                f"{self.size_mask_neighborhood}"
            )
        if self.size < 1:
            raise DinoError(f"--size must be a positive number of pixels, got {self.size}")


def working_size(height: int, width: int, size: int, patch: int) -> tuple[int, int]:
    """``(height, width)`` a frame is resized to: the shorter side ``size`` (rounded down to a
    multiple of the patch size), the longer side in proportion rounded down to a multiple of 64
    (of the patch size when it does not divide 64), as the reference does."""
    short = max(patch, size - size % patch)
    step = _LONG_SIDE_STEP if _LONG_SIDE_STEP % patch == 0 else patch
    if height > width:
        long_side = int(size * height / width // step * step)
    else:
        long_side = int(size * width / height // step * step)
    long_side = max(patch, long_side - long_side % patch)
    return (long_side, short) if height > width else (short, long_side)


def mask_to_labels(ids: np.ndarray, n_objects: int, grid: tuple[int, int]) -> torch.Tensor:
    """One-hot labels ``[n_objects + 1, h * w]`` of a mask resized (nearest) to the patch grid."""
    h, w = grid
    small = np.asarray(Image.fromarray(ids).resize((w, h), Image.Resampling.NEAREST))
    small = torch.from_numpy(small.astype(np.int64)).clamp_(max=n_objects)
    return F.one_hot(small.reshape(-1), n_objects + 1).T.float()


def labels_to_ids(
    labels: torch.Tensor, grid: tuple[int, int], patch: int, size_hw: tuple[int, int]
) -> np.ndarray:
    """Object ids ``[H, W]`` (uint8) of soft patch labels ``[C, h * w]``: bilinear upsampling by
    the patch size, each channel min-max normalized, argmax, nearest resize to ``size_hw``."""
    c = labels.shape[0]
    soft = labels.float().reshape(1, c, *grid)
    up = F.interpolate(soft, scale_factor=patch, mode="bilinear", align_corners=False)[0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    scaled = torch.where(span > 0, (up - lo) / span.clamp_min(1e-12), torch.ones_like(up))
    up = torch.where(hi > 0, scaled, up)
    ids = up.argmax(dim=0).to(torch.uint8).cpu().numpy()
    if ids.shape != tuple(size_hw):
        ids = np.asarray(
            Image.fromarray(ids).resize((size_hw[1], size_hw[0]), Image.Resampling.NEAREST)
        )
    return ids


# ------------------------------------------------------------------ label propagation


def propagate(
    target: torch.Tensor,
    sources: torch.Tensor,
    source_labels: torch.Tensor,
    grid: tuple[int, int],
    topk: int = 5,
    radius: int = 12,
    temperature: float = TEMPERATURE,
    chunk_elems: int = 1 << 24,
) -> torch.Tensor:
    """Labels ``[C, N]`` of the ``N = h * w`` target patches voted by their nearest sources.

    Args:
        target: L2-normalized target patch features ``[N, D]``.
        sources: L2-normalized features of the context frames ``[S, N, D]``.
        source_labels: their (soft) labels ``[S, C, N]``.
        grid: the patch grid ``(h, w)`` shared by all frames.
        topk: neighbours per target patch, over all context frames together.
        radius: sources must lie within this many patches (in x and in y) of the target
            patch's position; 0: anywhere.
        temperature: the votes' weights are ``softmax(sim / temperature)`` over the top k.
        chunk_elems: target patches are processed in blocks of at most this many similarities.
    """
    s, n, _d = sources.shape
    c = source_labels.shape[1]
    keys = sources.reshape(s * n, -1)
    values = source_labels.permute(1, 0, 2).reshape(c, s * n)
    k = min(topk, s * n)
    h, w = grid
    rows = torch.arange(n, device=target.device) // w
    cols = torch.arange(n, device=target.device) % w
    out = torch.empty(c, n, dtype=values.dtype, device=values.device)
    step = max(1, chunk_elems // (s * n))
    for start in range(0, n, step):
        stop = min(n, start + step)
        sim = target[start:stop] @ keys.T  # [b, S * N]
        if radius > 0:
            near = ((rows[start:stop, None] - rows[None]).abs() <= radius) & (
                (cols[start:stop, None] - cols[None]).abs() <= radius
            )  # [b, N]
            sim = sim.view(stop - start, s, n).masked_fill_(~near[:, None], float("-inf"))
            sim = sim.view(stop - start, s * n)
        top, idx = sim.topk(k, dim=1)
        weights = torch.softmax(top / temperature, dim=1)  # [b, k]
        out[:, start:stop] = (values[:, idx] * weights.to(values.dtype)).sum(-1)
    return out


class LabelPropagation:
    """The context of one video: the first frame and the last ``n_last_frames`` frames, each
    as (normalized patch features, labels). Calling it on a frame's features returns the frame's
    soft labels and pushes the frame into the context."""

    def __init__(
        self,
        first_features: torch.Tensor,
        first_labels: torch.Tensor,
        grid: tuple[int, int],
        settings: TrackSettings,
    ) -> None:
        self.grid, self.settings = grid, settings
        self.first = (F.normalize(first_features.float(), dim=1), first_labels.float())
        self.recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=settings.n_last_frames)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(features.float(), dim=1)
        context = [self.first, *self.recent]
        labels = propagate(
            feats,
            torch.stack([f for f, _ in context]),
            torch.stack([lab.to(feats.device) for _, lab in context]),
            self.grid,
            self.settings.topk,
            self.settings.size_mask_neighborhood,
        )
        self.recent.append((feats, labels))
        return labels
