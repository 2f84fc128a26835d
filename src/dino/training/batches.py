"""The source of augmented batches: the views of every step of an epoch, from either
augmentation path (batched on the device for in-memory data, per image in DataLoader workers
for folders)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import torch

from dino.config import Config
from dino.data.datasets import ImageFiles, TensorImages, decode_bad, loader_workers
from dino.data.multicrop import MultiCropTransform
from dino.data.sampler import GlobalBatchSampler
from dino.data.tensor_aug import TensorMultiCrop, ViewSpec
from dino.errors import DinoError
from dino.training.distributed import Dist


def _ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the training process, which saves and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Batches:
    """The augmented views of each step of an epoch, from either augmentation path.

    ``epoch(e, start)`` yields ``(views, bad)`` for steps ``start ..`` of epoch ``e``, where
    ``bad`` lists ``(path, reason)`` of the unreadable files replaced in that batch.
    """

    def __init__(
        self, cfg: Config, train: TensorImages | ImageFiles, d: Dist, device: torch.device
    ) -> None:
        self.cfg, self.device = cfg, device
        self.sampler = GlobalBatchSampler(
            len(train), cfg.optim.batch_size, d.world, d.rank, cfg.run.seed
        )
        if self.sampler.steps_per_epoch() < 1:
            raise DinoError(
                f"the dataset has {len(train)} images, fewer than one global batch of "
                f"{self.sampler.global_batch}; lower --batch-size"
            )
        dc = cfg.data
        mode = dc.augment
        if mode == "auto":
            mode = "tensor" if isinstance(train, TensorImages) else "pil"
        if mode == "tensor" and not isinstance(train, TensorImages):
            raise DinoError(
                "--augment tensor needs an in-memory dataset; use --augment pil for folders"
            )
        self.mode = mode
        if mode == "tensor":
            assert isinstance(train, TensorImages)
            views = [
                ViewSpec(dc.global_size, tuple(dc.global_scale), dc.blur_p[0], dc.solarize_p[0]),
                ViewSpec(dc.global_size, tuple(dc.global_scale), dc.blur_p[1], dc.solarize_p[1]),
            ] + [
                ViewSpec(dc.local_size, tuple(dc.local_scale), dc.blur_p[2], dc.solarize_p[2])
            ] * dc.local_crops
            self.aug = TensorMultiCrop(
                views,
                dc.brightness,
                dc.contrast,
                dc.saturation,
                dc.hue,
                dc.color_jitter_p,
                dc.grayscale_p,
                tuple(dc.blur_sigma),
                tuple(dc.mean),
                tuple(dc.std),
            )
            self.images = train.images.to(device)
        else:
            if isinstance(train, TensorImages):
                raise DinoError("--augment pil needs a folder of images; use --augment tensor")
            train.transform = MultiCropTransform(dc)
            train.seed = cfg.run.seed
            workers = loader_workers(dc.num_workers)
            self.loader = torch.utils.data.DataLoader(
                train,
                batch_sampler=self.sampler,
                num_workers=workers,
                pin_memory=device.type == "cuda",
                persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
                worker_init_fn=_ignore_sigint if workers > 0 else None,
                # its own generator: starting workers draws nothing from torch's global one
                generator=torch.Generator().manual_seed(cfg.run.seed),
            )

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[list[torch.Tensor], list[str]]]:
        self.sampler.set_epoch(epoch, start)
        if self.mode == "tensor":
            for step in range(start, self.sampler.steps_per_epoch()):
                idx = self.sampler.indices(step)
                imgs = self.images[torch.from_numpy(idx).to(self.images.device)]
                yield self.aug(imgs, idx, epoch, self.cfg.run.seed), []
        else:
            try:
                for views, _labels, bad in self.loader:
                    views = [v.to(self.device, non_blocking=True) for v in views]
                    yield views, decode_bad(bad)
            except DinoError as exc:  # raised in a worker: keep its last line, not the traceback
                raise DinoError(
                    str(exc).strip().splitlines()[-1].removeprefix("dino.errors.DinoError: ")
                ) from None
