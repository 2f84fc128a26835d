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

import numpy as np
import torch
import torch.nn.functional as F

from dino.config import DataConfig
from dino.data.crop_draws import (
    CROP_DRAWS,
    ViewSpec,
    crop_boxes,
    resize_weights,
    view_specs,
    view_uniforms,
)
from dino.data.photometric import PIXEL_MAX, Photometric

#: Largest ``C * size * H * (W + size)`` (multiply-adds per row) resized by matrix products on
#: CPUs; above it, one antialiased ``uint8`` resize call per row is faster.
_DENSE_RESIZE_MACS = 1 << 18


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
                x.index_copy_(0, torch.from_numpy(pos[rows]).to(x.device), y.clamp_(0, PIXEL_MAX))
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
