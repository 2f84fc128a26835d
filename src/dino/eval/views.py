"""What the evaluations feed a frozen backbone: the datasets, the eval and train views, batches.

The eval view is the reference protocol's (docs/recipe.md, "Evaluation protocols"): resize the
shorter side (bicubic), center-crop, normalize. Its sizes and statistics come, in order, from
explicit arguments, the ``dino train`` run that wrote the weights (its ``data`` config), the
``fashion-mnist`` preset for the built-in data set (28x28, no resize), else the reference protocol
(256 -> 224, ImageNet statistics).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from dino.data import multicrop
from dino.data.datasets import BUILTIN, ImageFiles, TensorImages, open_training_data
from dino.data.seeding import sample_seed
from dino.errors import DinoError
from dino.eval.features import loader_batches, tensor_eval_batches
from dino.models.weights import config_stats

Data = TensorImages | ImageFiles


@dataclass
class EvalView:
    """The evaluation input: shorter side resized to ``resize``, center crop ``crop``."""

    resize: int
    crop: int
    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def resolve_view(
    data: str,
    run_config: dict | None = None,
    resize: int | None = None,
    crop: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> EvalView:
    """The eval view for ``data`` and weights whose ``dino train`` config is ``run_config``.

    Built-in ``fashion-mnist`` uses its preset's view (28x28, no resize) with the run's
    mean/std when there is a run; a folder uses the run's view, else the reference protocol.
    Explicit arguments win.
    """
    run_data = (run_config or {}).get("data") or {}
    if data in BUILTIN:
        from dino.config_load import load_config

        preset = load_config(data).data
        base = EvalView(preset.eval_resize, preset.eval_crop, list(preset.mean), list(preset.std))
        if run_data:
            base.mean, base.std = (list(v) for v in config_stats(run_config))
    else:
        base = EvalView(
            int(run_data.get("eval_resize", 256)),
            int(run_data.get("eval_crop", 224)),
            *(list(v) for v in config_stats(run_config)),
        )
    view = EvalView(
        resize or base.resize,
        crop or base.crop,
        list(mean) if mean else base.mean,
        list(std) if std else base.std,
    )
    if view.crop > view.resize:
        raise DinoError(
            f"eval crop {view.crop} is larger than the eval resize {view.resize}; pass "
            "--eval-resize at least as large as --eval-crop"
        )
    for name, values in (("mean", view.mean), ("std", view.std)):
        if len(values) != 3:
            raise DinoError(f"--{name} needs 3 numbers (R G B), got {values}")
    return view


def eval_transform(view: EvalView) -> v2.Compose:
    """Resize (bicubic) + center crop + normalize, for PIL images or uint8 ``[3, H, W]``."""
    return multicrop.eval_transform(view.resize, view.crop, view.mean, view.std)


def train_transform(view: EvalView) -> v2.Compose:
    """The linear probe's training view: RandomResizedCrop (bicubic) + flip + normalize."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                view.crop, interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(view.mean, view.std),
        ]
    )


class TensorViews(Dataset):
    """An in-memory dataset seen through a per-image transform; ``ds[(epoch, i)]`` seeds the
    transform from (seed, epoch, i), as :class:`~dino.data.datasets.ImageFiles` does."""

    def __init__(self, data: TensorImages, transform: v2.Compose, seed: int = 0) -> None:
        self.data, self.transform, self.seed = data, transform, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, str]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img = self.data.images[index]
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            x = self.transform(img)
        label = -1 if self.data.labels is None else int(self.data.labels[index])
        return torch.as_tensor(x), label, ""


def with_transform(data: Data, transform: v2.Compose, seed: int = 0) -> Dataset:
    """``data`` as a Dataset of ``(transform(image), label, bad)`` items (``bad``: see
    :class:`dino.data.datasets.ImageFiles`)."""
    if isinstance(data, TensorImages):
        return TensorViews(data, transform, seed)
    return ImageFiles(data.root, transform, seed, files=(data.files, data.labels, data.classes))


class EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(epoch, index)`` keys in a shuffled order that depends on (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, epoch: int, seed: int = 0) -> None:
        self.n, self.batch_size, self.epoch, self.seed = n, batch_size, epoch, seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
        for start in range(0, self.n, self.batch_size):
            yield [(self.epoch, int(i)) for i in order[start : start + self.batch_size]]

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def eval_batches(
    data: Data,
    view: EvalView,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (normalized eval views, labels), in dataset order."""
    if isinstance(data, TensorImages):
        yield from tensor_eval_batches(
            data, view.resize, view.crop, view.mean, view.std, batch_size, device
        )
        return
    dataset = with_transform(data, eval_transform(view))
    for x, y, _bad in loader_batches(dataset, batch_size, num_workers, device):
        yield x, y


def labels_of(data: Data) -> torch.Tensor:
    if isinstance(data, TensorImages):
        return data.labels if data.labels is not None else torch.full((len(data),), -1)
    return torch.as_tensor(data.labels, dtype=torch.long)


def num_classes(train: Data, val: Data | None = None) -> int:
    """Number of classes of a labeled split pair (from the class names, else the labels)."""
    if train.classes:
        return len(train.classes)
    top = int(labels_of(train).max())
    if val is not None:
        top = max(top, int(labels_of(val).max()))
    return top + 1


def open_labeled(data: str, subset: int = 0) -> tuple[Data, Data]:
    """The (train, val) splits of ``--data``: the built-in data set's train/test, or a folder's
    ``train/`` and ``val/`` (or ``test/``) class subfolders."""
    d = open_training_data(data, subset)
    if d.knn_bank is None or d.knn_query is None:
        raise DinoError(
            f"{data} has no labeled train/val split; make it hold train/ and val/ folders with one "
            "subfolder of images per class, or use --data fashion-mnist"
        )
    return d.knn_bank, d.knn_query
