"""The student and teacher networks of a run, and the check that they take its crop sizes."""

from __future__ import annotations

import logging

import torch
from torch import nn

from dino.config import Config
from dino.errors import DinoError
from dino.models.backbones import build_backbone, has_batchnorm
from dino.models.head import DINOHead
from dino.models.multicrop import MultiCropNet

log = logging.getLogger("dino")


def build_networks(cfg: Config, load_init: bool = True) -> tuple[MultiCropNet, MultiCropNet]:
    """Student (with drop path) and teacher (a copy of it without drop path, no gradients).
    With iBOT (``--ibot-weight``) both also hold a mask token and, with
    ``--ibot-separate-head``, a patch head shaped as the DINO head.

    With ``cfg.model.init`` (and ``load_init``; a resumed run has its own weights) both
    backbones start from those pretrained weights (:func:`dino.models.weights.init_backbone`).
    """
    m = cfg.model

    def net(drop_path: float) -> MultiCropNet:
        backbone = build_backbone(
            m.arch,
            m.patch_size,
            cfg.data.global_size,
            m.depth,
            drop_path_rate=drop_path,
            registers=m.registers,
        )

        def head() -> DINOHead:
            return DINOHead(
                backbone.embed_dim,
                m.out_dim,
                m.head_hidden_dim,
                m.head_bottleneck_dim,
                use_bn=m.use_bn_in_head,
                norm_last_layer=m.norm_last_layer,
            )

        dino_head = head()
        ibot = cfg.loss.ibot_weight > 0  # a mask token, and maybe a patch head of its own
        patch_head = head() if ibot and cfg.loss.ibot_separate_head else None
        return MultiCropNet(backbone, dino_head, ibot=ibot, patch_head=patch_head)

    student = net(m.drop_path_rate)
    if cfg.run.checkpoint_activations:
        checkpoint_activations(student.backbone, m.arch)
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


def checkpoint_activations(backbone: nn.Module, arch: str) -> None:
    """Recompute the activations of ``backbone``'s blocks in the backward pass instead of
    keeping them (timm's ``set_grad_checkpointing``: ``torch.utils.checkpoint`` over the
    blocks, with the random state of drop path replayed, so the gradients are unchanged)."""
    if not hasattr(backbone, "set_grad_checkpointing"):
        raise DinoError(
            f"--checkpoint-activations needs a timm backbone (our ViTs or a timm name), not "
            f"{arch}; drop the flag"
        )
    backbone.set_grad_checkpointing(True)


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
