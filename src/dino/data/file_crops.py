"""The geometric half of the multi-crop views of image files, per image in DataLoader workers.

A worker does only what needs the original image: decode it (a JPEG at 1/2, 1/4 or 1/8 of its
size when every view's crop still has at least as many pixels as the view: PIL's ``draft``, which
scales in the DCT and costs less than a full decode) and cut each view's random resized crop,
resized (bicubic, antialiased: torch's ``uint8`` kernel, the one the PIL path and the in-memory
path run) to the view's final size, and flip it when the view's flip draw says so (cheapest on
the small ``uint8`` crop). Its output is small ``uint8`` tensors; the rest of the photometric
half (color jitter, grayscale, blur, solarization, normalization) runs batched on the training
device (:meth:`dino.data.tensor_aug.TensorMultiCrop.from_crops`).

The crop boxes and flips come from the same counter-based draws as the in-memory path
(:func:`dino.data.crop_draws.view_uniforms`), computed on the image's full size, so a sample's
views depend only on (seed, epoch, index), never on the worker or process that makes them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dino.data.crop_draws import CROP_DRAWS, FLIP_DRAW, ViewSpec, crop_boxes
from dino.data.datasets import ImageFiles, opened_image, to_rgb
from dino.data.seeding import sample_keys, uniforms


class FileCrops:
    """``path, epoch, index -> crops``: one ``uint8 [len(group), 3, size, size]`` tensor per
    group of views of equal size (the groups of
    :meth:`dino.data.tensor_aug.TensorMultiCrop.size_groups`), flipped as :meth:`flips` says.

    Raises :class:`dino.data.datasets.BadImage` for a file that cannot be decoded.
    """

    def __init__(self, views: list[ViewSpec], seed: int) -> None:
        self.views = views
        self.seed = seed
        sizes = dict.fromkeys(spec.size for spec in views)
        self.groups = [[v for v, spec in enumerate(views) if spec.size == s] for s in sizes]
        scales = dict.fromkeys(spec.scale for spec in views)
        self._by_scale = {s: [v for v, spec in enumerate(views) if spec.scale == s] for s in scales}

    def boxes(self, epoch: int, index: int, height: int, width: int) -> np.ndarray:
        """``[len(views), 4]`` crop boxes (top, left, h, w) of sample ``index`` in an image of
        ``height x width`` pixels: the in-memory path's boxes for the same sample (stream ``v``
        for view ``v``)."""
        return self._draws(epoch, index, height, width)[0]

    def flips(self, epoch: int, index: int) -> np.ndarray:
        """``[len(views)]`` bool: the views of sample ``index`` flipped horizontally (their
        :data:`~dino.data.crop_draws.FLIP_DRAW`, as the in-memory path flips them)."""
        return self._draws(epoch, index, 1, 1)[1]

    def _draws(
        self, epoch: int, index: int, height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        streams = np.arange(len(self.views), dtype=np.uint64)
        keys = sample_keys(self.seed, epoch, np.array([index]), stream=streams)
        u = uniforms(keys, FLIP_DRAW + 1)
        boxes = np.empty((len(self.views), 4))
        for scale, rows in self._by_scale.items():
            boxes[rows] = crop_boxes(u[rows, :CROP_DRAWS], height, width, scale)
        return boxes, u[:, FLIP_DRAW] < 0.5

    def __call__(self, path: str, epoch: int, index: int) -> tuple[torch.Tensor, ...]:
        with opened_image(path) as im:
            width, height = im.size
            boxes, flips = self._draws(epoch, index, height, width)
            sizes = np.array([spec.size for spec in self.views], dtype=np.float64)
            # the crops keep at least a view's pixels when the image is this much smaller
            allowed = float(np.min(np.minimum(boxes[:, 2], boxes[:, 3]) / sizes))
            rgb = to_rgb(im, allowed)
            pixels = np.array(rgb)  # [H, W, 3], while the file is open (lazy decoders)
        img = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # channels-last: torch's fast kernel
        h_img, w_img = pixels.shape[:2]
        if (h_img, w_img) != (height, width):  # decoded at 1/s: boxes in its pixels
            s = round(width / w_img)
            top, left = np.round(boxes[:, 0] / s), np.round(boxes[:, 1] / s)
            bottom = np.clip(np.round((boxes[:, 0] + boxes[:, 2]) / s), top + 1, h_img)
            right = np.clip(np.round((boxes[:, 1] + boxes[:, 3]) / s), left + 1, w_img)
            boxes = np.stack([top, left, bottom - top, right - left], 1)
        boxes = boxes.astype(np.int64)
        out = []
        for group in self.groups:
            size = self.views[group[0]].size
            crops = torch.empty((len(group), 3, size, size), dtype=torch.uint8)
            for j, v in enumerate(group):
                t, lft, h, w = boxes[v].tolist()
                y = F.interpolate(
                    img[:, :, t : t + h, lft : lft + w],
                    size=(size, size),
                    mode="bicubic",
                    antialias=True,
                )[0]
                crops[j] = y.flip(-1) if flips[v] else y
            out.append(crops)
        return tuple(out)


class CropFiles(torch.utils.data.Dataset):
    """The images of an :class:`~dino.data.datasets.ImageFiles` as crops for the batched path:
    ``ds[(epoch, i)] -> (crops, label, bad, i)`` (``crops`` and ``bad``: see :class:`FileCrops`
    and :class:`~dino.data.datasets.ImageFiles`; an unreadable file is replaced by the next
    readable one, with the crops of sample ``i``'s draws)."""

    def __init__(self, files: ImageFiles, crops: FileCrops) -> None:
        self.files = files
        self.crops = crops

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[torch.Tensor, ...], int, str, int]:
        epoch, index = key
        crops, label, bad = self.files.read(index, lambda p: self.crops(p, epoch, index))
        return crops, label, bad, index  # type: ignore[return-value]
