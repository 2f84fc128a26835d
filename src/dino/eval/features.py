"""Feature extraction with a frozen backbone, from an in-memory dataset or a folder of images."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dino.data.datasets import TensorImages, loader_workers


def tensor_eval_batches(
    ds: TensorImages,
    resize: int,
    crop: int,
    mean: list[float],
    std: list[float],
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (normalized eval views, labels) of an in-memory dataset: resize the shorter
    side (bicubic) then center-crop, as the eval transform does for image files."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    labels = ds.labels if ds.labels is not None else torch.full((len(ds),), -1)
    for start in range(0, len(ds), batch_size):
        x = ds.images[start : start + batch_size].to(device).float().div_(255)
        h, w = x.shape[-2:]
        if min(h, w) != resize:
            scale = resize / min(h, w)
            size = (max(round(h * scale), crop), max(round(w * scale), crop))
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp_(0, 1)
        h, w = x.shape[-2:]
        top, left = (h - crop) // 2, (w - crop) // 2
        x = x[..., top : top + crop, left : left + crop]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        yield (x - m) / s, labels[start : start + batch_size]


def loader_batches(
    dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Batches ``(views on device, labels, bad)`` of a dataset of ``(view, label, bad)`` items
    (:class:`~dino.data.datasets.ImageFiles` with the eval transform), in dataset order;
    ``num_workers`` -1 picks :func:`~dino.data.datasets.loader_workers`."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=loader_workers(num_workers),
        pin_memory=device.type == "cuda",
    )
    for x, y, bad in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y), list(bad)


@torch.no_grad()
def extract(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on every batch; returns float32 features ``[N, D]`` (on CPU) and labels."""
    feats, labels = [], []
    for x, y in batches:
        with torch.autocast(
            x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            f = model(x)
        feats.append(f.float().cpu())
        labels.append(y.cpu())
        if progress:
            progress(x.shape[0])
    return torch.cat(feats), torch.cat(labels)
