"""What a training step changes: the student and teacher networks, the optimizer, the losses (with
their centers) and the fp16 loss scaler, gathered in a :class:`Learner`; and
:func:`build_learner`, which makes the one of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dino.config import Config
from dino.devices import AUTOCAST_DTYPES
from dino.errors import DinoError
from dino.loss import DINOLoss
from dino.models.backbones import has_batchnorm
from dino.models.multicrop import MultiCropNet
from dino.training.additions import Additions
from dino.training.distributed import Dist, sync_batchnorm
from dino.training.init_from import init_head_and_center
from dino.training.networks import build_networks
from dino.training.optim import build_optimizer


@dataclass
class Learner:
    """The state a step of :func:`dino.training.step.train_step` reads and updates.

    ``student_ddp``: the student wrapped for several processes (None: the student itself);
    ``clip_grad``: each parameter's gradient norm limit (0: none); ``accumulate``: the batches
    each optimizer step sums (gradient accumulation); ``world``: the number of processes.
    """

    student: MultiCropNet
    teacher: MultiCropNet
    optimizer: torch.optim.Optimizer
    loss_fn: DINOLoss
    additions: Additions
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None = None
    student_ddp: nn.Module | None = None
    clip_grad: float = 0.0
    accumulate: int = 1
    world: int = 1
    params: list[nn.Parameter] = field(init=False)
    last_layer: list[nn.Parameter] = field(init=False)
    head_has_bn: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.student_ddp is None:
            self.student_ddp = self.student
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        heads = [h for h in (self.student.head, self.student.patch_head) if h is not None]
        self.last_layer = [p for h in heads for p in h.last_layer.parameters() if p.requires_grad]
        self.head_has_bn = has_batchnorm(self.student.head)  # then all views go through together

    def autocast(self) -> torch.autocast:
        """The mixed precision of the networks' forward passes (a no-op in fp32)."""
        device = next(self.student.parameters()).device.type
        dtype = self.autocast_dtype
        return torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)

    def state_dict(self) -> dict[str, Any]:
        """Networks, optimizer, scaler and the losses' centers (pending updates applied)."""
        self.loss_fn.apply_center_update()
        self.additions.apply_center_update()
        ibot = self.additions.ibot_loss
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "dino_loss": self.loss_fn.state_dict(),
            **({"ibot_loss": ibot.state_dict()} if ibot is not None else {}),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        """Put a checkpoint's networks, optimizer, scaler and centers in place."""
        try:
            self.student.load_state_dict(s["student"])
            self.teacher.load_state_dict(s["teacher"])
            self.optimizer.load_state_dict(s["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DinoError(
                f"the checkpoint does not match this config ({str(exc).splitlines()[0]}); resume "
                "with the config.yaml of its run folder"
            ) from None
        self.scaler.load_state_dict(s["scaler"])
        self.loss_fn.load_state_dict(s["dino_loss"])
        if self.additions.ibot_loss is not None and "ibot_loss" in s:
            self.additions.ibot_loss.load_state_dict(s["ibot_loss"])


def build_learner(
    cfg: Config, d: Dist, device: torch.device, precision: str, load_init: bool = True
) -> Learner:
    """The learner of a run of ``cfg`` on ``device`` (seeded: identical on every process).
    ``load_init``: start from ``--init`` weights (a resumed run has its own)."""
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    student, teacher = build_networks(cfg, load_init=load_init)
    student.to(device)
    teacher.to(device)
    if d.world > 1 and has_batchnorm(student):  # any BatchNorm, head's included
        student = sync_batchnorm(student, device)  # global-batch statistics
        teacher = sync_batchnorm(teacher, device)
    if cfg.run.compile:  # in place: parameter names (checkpoints) and DDP are unchanged
        student.compile()
        teacher.compile()
    student_ddp = None
    if d.world > 1:
        student_ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    lo = cfg.loss
    loss_fn = DINOLoss(cfg.model.out_dim, 2, lo.student_temp, lo.center_momentum, lo.centering)
    loss_fn.to(device)
    if load_init:  # continued pretraining (--init): the DINO head and the loss center too
        init_head_and_center(student, teacher, loss_fn, cfg.model)
    return Learner(
        student,
        teacher,
        build_optimizer(student, cfg, device),
        loss_fn,
        Additions(cfg, d.rank, device),  # DINOv2's KoLeo and iBOT
        torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        AUTOCAST_DTYPES[precision],
        student_ddp,
        cfg.optim.clip_grad,
        cfg.optim.accumulate,
        d.world,
    )
