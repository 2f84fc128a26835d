"""Everything a run needs before its first step: processes, device, precision, networks,
optimizer, schedules and the source of augmented batches."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dino.config import Config
from dino.data.datasets import ImageFiles, TensorImages, decode_bad, default_num_workers
from dino.data.multicrop import MultiCropTransform
from dino.data.sampler import GlobalBatchSampler
from dino.data.tensor_aug import TensorMultiCrop, ViewSpec
from dino.errors import DinoError
from dino.models.backbones import build_backbone, has_batchnorm
from dino.models.head import DINOHead
from dino.models.multicrop import MultiCropNet
from dino.training.schedules import cosine_schedule, linear_warmup_then_constant

log = logging.getLogger("dino")


@dataclass
class Dist:
    """The process group of this run (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group if :func:`setup_distributed` created it (end of a run)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device: str) -> Dist:
    """Join the process group that torchrun describes in the environment, if any.

    NCCL when the run uses GPUs (process ``LOCAL_RANK`` of a node takes GPU ``LOCAL_RANK``),
    gloo on CPUs. Collectives fail after ``DINO_DIST_TIMEOUT`` seconds (default 600) instead of
    torch's 30 minutes when a process hangs. Processes other than rank 0 log errors only.
    """
    from dino.training.distributed import collective_timeout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DinoError(
                f"process rank {rank} is local process {local_rank} of its machine but only "
                f"{torch.cuda.device_count()} GPU(s) are visible; start at most that many "
                "processes per machine (--nproc / --nproc-per-node) or use --device cpu"
            )
        torch.cuda.set_device(local_rank)
    if rank != 0:
        logging.getLogger("dino").setLevel(logging.ERROR)
    owns = False
    if not dist.is_initialized():
        extra = {"device_id": torch.device("cuda", local_rank)} if use_cuda else {}
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=collective_timeout(), **extra
        )
        owns = True
    return Dist(rank, world, local_rank, owns)


def resolve_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and d.world > 1:
        name = f"cuda:{d.local_rank}"
    elif name.startswith("cuda:") and d.world > 1:
        raise DinoError(
            f"--device {name} would put every process on one GPU; with several processes use "
            "--device cuda (process LOCAL_RANK takes GPU LOCAL_RANK) and choose the GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DinoError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DinoError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CPUs and GPUs that support it, else fp16 on CUDA, else fp32."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DinoError("this GPU has no bf16 support; use --precision fp16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return "bf16"
        except (AttributeError, RuntimeError):
            pass
    return "fp32"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def build_networks(cfg: Config, load_init: bool = True) -> tuple[MultiCropNet, MultiCropNet]:
    """Student (with drop path) and teacher (a copy of it without drop path, no gradients).

    With ``cfg.model.init`` (and ``load_init``; a resumed run has its own weights) both
    backbones start from those pretrained weights (:func:`dino.models.weights.init_backbone`).
    """
    m = cfg.model

    def net(drop_path: float) -> MultiCropNet:
        backbone = build_backbone(
            m.arch, m.patch_size, cfg.data.global_size, m.depth, drop_path_rate=drop_path
        )
        head = DINOHead(
            backbone.embed_dim,
            m.out_dim,
            m.head_hidden_dim,
            m.head_bottleneck_dim,
            use_bn=m.use_bn_in_head,
            norm_last_layer=m.norm_last_layer,
        )
        return MultiCropNet(backbone, head)

    student = net(m.drop_path_rate)
    check_input_sizes(student.backbone, cfg)
    if m.init and load_init:
        from dino.models.weights import init_backbone

        log.info(init_backbone(student.backbone, m.init, m.arch, m.patch_size))
    teacher = net(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if has_batchnorm(student.backbone):
        # NHWC: oneDNN's and cuDNN's fast convolution layout (benchmarks/step_parts.py)
        for net in (student, teacher):
            net.to(memory_format=torch.channels_last)
            net.channels_last = True
    return student, teacher


def check_input_sizes(backbone: nn.Module, cfg: Config) -> None:
    """Fail early, in one sentence, when the backbone cannot take the run's crop sizes: a patch
    size that does not divide them (timm ViTs), or crops too small for a convnet's strides."""
    d = cfg.data
    sizes = {"global_size": d.global_size, "local_size": d.local_size, "eval_crop": d.eval_crop}
    if d.local_crops == 0:
        del sizes["local_size"]
    embed = getattr(backbone, "patch_embed", None)
    if embed is not None and hasattr(embed, "patch_size"):
        p = embed.patch_size
        p = int(p[0] if isinstance(p, (tuple, list)) else p)
        for name, size in sizes.items():
            if size % p:
                raise DinoError(
                    f"{name}={size} is not divisible by the patch size {p} of {cfg.model.arch}; "
                    "choose crop sizes that are multiples of it"
                )
        return
    smallest = min(sizes.values())
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, smallest, smallest))
    except (RuntimeError, ValueError, AssertionError) as exc:
        name = min(sizes, key=lambda k: sizes[k])
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DinoError(
            f"{cfg.model.arch} cannot take {smallest}-pixel crops ({name}; {reason}); "
            "raise it (convnets need crops of at least their total stride, often 32)"
        ) from None
    finally:
        backbone.train(was_training)


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weight matrices only: biases and 1-D parameters (norms) get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "apply_wd": True},
        {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """``--optimizer``: AdamW, or SGD with momentum 0.9; ``auto`` picks AdamW for ViTs and
    backbones without BatchNorm, SGD for BatchNorm convnets (the reference's choices)."""
    groups = param_groups(model)
    kind = cfg.optim.optimizer
    if kind == "auto":
        vit_like = cfg.model.arch.startswith("vit_") or not has_batchnorm(model)
        kind = "adamw" if vit_like else "sgd"
    if kind == "adamw":
        # The fused kernel updates each parameter in one pass; on CPUs it is 2-3x faster than
        # foreach, which allocates temporaries the size of the model (docs/performance.md).
        if device.type in ("cpu", "cuda"):
            return torch.optim.AdamW(groups, lr=0.0, fused=True)
        return torch.optim.AdamW(groups, lr=0.0, foreach=True)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9)


@dataclass
class Schedules:
    """One value per iteration of every scheduled quantity."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @classmethod
    def build(cls, cfg: Config, steps_per_epoch: int, global_batch: int) -> Schedules:
        o, lo = cfg.optim, cfg.loss
        total = o.epochs * steps_per_epoch
        peak = o.lr * global_batch / 256.0
        return cls(
            lr=cosine_schedule(peak, o.min_lr, total, round(o.warmup_epochs * steps_per_epoch)),
            wd=cosine_schedule(o.weight_decay, o.weight_decay_end, total),
            momentum=cosine_schedule(o.momentum_teacher, 1.0, total),
            teacher_temp=linear_warmup_then_constant(
                lo.warmup_teacher_temp,
                lo.teacher_temp,
                total,
                round(lo.warmup_teacher_temp_epochs * steps_per_epoch),
            ),
        )


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
            workers = dc.num_workers if dc.num_workers >= 0 else default_num_workers()
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
