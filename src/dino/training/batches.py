"""The source of augmented batches: the views of every step of an epoch, from either
augmentation path: batched on the training device (in-memory data; for folders, after DataLoader
workers decoded and cropped each image), or all per image in DataLoader workers (``--augment
pil``, folders)."""

from __future__ import annotations

import atexit
import multiprocessing.util  # registers its exit handler now, before ours below
import signal
import weakref
from collections.abc import Iterator

import torch

from dino.config import Config
from dino.data.datasets import ImageFiles, TensorImages, decode_bad, loader_workers
from dino.data.file_crops import CropFiles, FileCrops
from dino.data.multicrop import MultiCropTransform
from dino.data.sampler import GlobalBatchSampler
from dino.data.tensor_aug import TensorMultiCrop
from dino.errors import DinoError
from dino.training.distributed import Dist


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT (Ctrl-C) and SIGTERM to the training process, which
    saves a checkpoint and stops them: a signal sent to the whole process group (a scheduler's
    preemption, ``timeout``, Ctrl-C in a terminal) reaches the workers too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


#: The DataLoader worker processes this process started (a weak set: joined ones drop out).
_WORKERS: weakref.WeakSet[multiprocessing.Process] = weakref.WeakSet()


@atexit.register
def _kill_leftover_workers() -> None:
    """At exit, end every DataLoader worker still alive (a run that stopped on an error leaves
    its persistent workers waiting for work). They ignore SIGTERM, so multiprocessing's exit
    handler, which terminates and then joins its daemonic children, would wait for them forever.
    This handler runs before that one: ``atexit`` runs the last registered first, and
    ``multiprocessing`` registered its handler when it was imported, above."""
    for worker in list(_WORKERS):
        if worker.is_alive():
            worker.kill()  # SIGKILL: a worker only decodes and crops, it holds nothing to save
        worker.join()


def check_steps_per_epoch(n: int, cfg: Config, world: int) -> int:
    """The optimizer steps of an epoch of ``n`` images (each one a global batch of
    ``--batch-size`` x ``--accumulate`` x ``world``); refuses data smaller than one batch."""
    global_batch = cfg.optim.batch_size * cfg.optim.accumulate * world
    if n < global_batch:
        raise DinoError(
            f"the dataset has {n} images, fewer than one global batch of {global_batch}; lower "
            "--batch-size" + (" or --accumulate" if cfg.optim.accumulate > 1 else "")
        )
    return n // global_batch


class Batches:
    """The augmented views of each step of an epoch, from either augmentation path.

    ``epoch(e, start)`` yields ``(views, bad)`` for steps ``start ..`` of epoch ``e``, where
    ``bad`` lists ``(path, reason)`` of the unreadable files replaced in that batch.
    """

    def __init__(
        self, cfg: Config, train: TensorImages | ImageFiles, d: Dist, device: torch.device
    ) -> None:
        self.cfg, self.device = cfg, device
        check_steps_per_epoch(len(train), cfg, d.world)
        process_batch = cfg.optim.batch_size * cfg.optim.accumulate  # images per optimizer step
        self.sampler = GlobalBatchSampler(len(train), process_batch, d.world, d.rank, cfg.run.seed)
        dc = cfg.data
        mode = "tensor" if dc.augment == "auto" else dc.augment
        if mode == "pil" and isinstance(train, TensorImages):
            raise DinoError("--augment pil needs a folder of images; use --augment tensor")
        self.mode = mode
        self.in_memory = isinstance(train, TensorImages)
        if mode == "tensor":
            self.aug = TensorMultiCrop.from_config(dc)
            if isinstance(train, TensorImages):
                self.images = train.images.to(device)
            else:  # workers decode and crop, the photometric half runs here
                crops = FileCrops(self.aug.views, cfg.run.seed)
                self.loader = self._loader(CropFiles(train, crops), dc.num_workers)
        else:
            assert isinstance(train, ImageFiles)
            train.transform = MultiCropTransform(dc)
            train.seed = cfg.run.seed
            self.loader = self._loader(train, dc.num_workers)

    def _loader(
        self, dataset: torch.utils.data.Dataset, num_workers: int
    ) -> torch.utils.data.DataLoader:
        workers = loader_workers(num_workers)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=_ignore_stop_signals if workers > 0 else None,
            # its own generator: starting workers draws nothing from torch's global one
            generator=torch.Generator().manual_seed(self.cfg.run.seed),
        )
        return loader

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[list[torch.Tensor], list[str]]]:
        self.sampler.set_epoch(epoch, start)
        seed = self.cfg.run.seed
        if self.in_memory:
            for step in range(start, self.sampler.steps_per_epoch()):
                idx = self.sampler.indices(step)
                imgs = self.images[torch.from_numpy(idx).to(self.images.device)]
                yield self.aug(imgs, idx, epoch, seed), []
        else:
            iterator = iter(self.loader)
            _WORKERS.update(getattr(iterator, "_workers", ()))
            try:
                for batch in iterator:
                    if self.mode == "tensor":  # uint8 crops of each image -> photometric half
                        crops, _labels, bad, index = batch
                        crops = [c.to(self.device, non_blocking=True) for c in crops]
                        views = self.aug.from_crops(crops, index.numpy(), epoch, seed)
                    else:
                        views, _labels, bad = batch
                        views = [v.to(self.device, non_blocking=True) for v in views]
                    yield views, decode_bad(bad)
            except DinoError as exc:  # raised in a worker: keep its last line, not the traceback
                raise DinoError(
                    str(exc).strip().splitlines()[-1].removeprefix("dino.errors.DinoError: ")
                ) from None
