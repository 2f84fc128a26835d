"""Continued pretraining: what ``--init`` takes from a full DINO checkpoint besides the backbone,
and the k-NN of the starting weights that every later evaluation is compared with.

A full checkpoint (a ``dino train`` run folder or its ``checkpoint.pth``, or the reference
code's ``*_full_checkpoint.pth``) holds the teacher's DINO head and the loss center too. Starting
from them continues the self-distillation where it stood: the prototypes and the center already
agree with the backbone, so the first steps do not spend the features on re-learning a random
head. They are loaded when their shapes fit the run's head (the same ``--out-dim``, hidden and
bottleneck sizes); ``--new-head true`` starts a random head instead (the backbone alone is
loaded, as for a published backbone or ``timm:`` weights). Student and teacher both start from
the checkpoint's teacher, as they do from a backbone.

Continuing is meant to keep what the weights knew: the k-NN accuracy of the starting teacher is
measured before the first step (``knn_start``) and logged beside every later evaluation, with a
warning when the run has fallen below it.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino.config import ModelConfig
from dino.training.metrics import MetricsFile

log = logging.getLogger("dino")

#: The reference code's weight-normed last layer (``torch.nn.utils.weight_norm``) and ours
#: (``torch.nn.utils.parametrizations.weight_norm``) name the same two tensors differently.
WEIGHT_NORM_NAMES = {
    "last_layer.weight_g": "last_layer.parametrizations.weight.original0",
    "last_layer.weight_v": "last_layer.parametrizations.weight.original1",
}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_full_checkpoint(init: str) -> dict[str, Any] | None:
    """The contents of a full DINO checkpoint that ``init`` names (a file, or a run folder's
    ``checkpoint.pth``), or None for anything else (a backbone file, a published name, timm)."""
    path = Path(init)
    if path.is_dir():
        path = path / "checkpoint.pth"
    if not path.is_file():
        return None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # the reference's argparse namespace, our RNG states
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # the backbone loader already read it; nothing more to take from it
        return None
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        return obj
    return None


def head_state(network: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The DINO head's tensors of a checkpoint's network, named as our :class:`DINOHead`'s."""
    state = {k: v for k, v in network.items() if isinstance(v, torch.Tensor)}
    for prefix in WRAPPER_PREFIXES:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    return {WEIGHT_NORM_NAMES.get(k, k): v for k, v in head.items()}


def fits(state: dict[str, torch.Tensor], module: nn.Module) -> bool:
    """Whether ``state`` has exactly the tensors of ``module``, shape for shape."""
    own = module.state_dict()
    return set(state) == set(own) and all(state[k].shape == own[k].shape for k in own)


def init_head_and_center(
    student: nn.Module, teacher: nn.Module, loss_fn: nn.Module, model: ModelConfig
) -> bool:
    """Load the DINO head of the full checkpoint ``model.init`` into ``student`` and ``teacher``,
    and its loss center into ``loss_fn``, unless ``model.new_head``; returns whether the head was
    loaded (False without ``--init``)."""
    init = model.init
    if not init:
        return False
    if model.new_head:
        log.info("DINO head: new (--new-head)")
        return False
    ckpt = read_full_checkpoint(init)
    if ckpt is None:
        return False
    state = head_state(ckpt["teacher"])
    if not state:
        log.info("DINO head: new (%s holds no head)", init)
        return False
    if not fits(state, student.head):
        log.warning(
            "DINO head: new; the head of %s does not fit this run's (another --out-dim, "
            "--head-hidden-dim, --head-bottleneck-dim or --use-bn-in-head); pass the sizes it "
            "was trained with to continue it, or --new-head true to say a new head is meant",
            init,
        )
        return False
    for net in (student, teacher):
        net.head.load_state_dict(state)
    log.info("DINO head loaded from %s (%d tensors)", init, len(state))
    saved = ckpt.get("dino_loss")
    center = saved.get("center") if isinstance(saved, dict) else None
    own = getattr(loss_fn, "center", None)
    if center is not None and own is not None and center.shape == own.shape:
        with torch.no_grad():
            own.copy_(center.to(own))
        log.info("loss center loaded from %s", init)
    return True


def top1(knn: dict[str, dict[str, float]]) -> float:
    """The headline k-NN top-1 of an evaluation: k = 20, else the first k reported."""
    return (knn.get("20") or next(iter(knn.values())))["top1"]


def against_start(
    knn: dict[str, dict[str, float]], start: dict[str, dict[str, float]] | None
) -> dict[str, float]:
    """The ``knn_start`` fields logged beside an evaluation, with a warning when the k-NN fell
    below the starting weights'."""
    if not start:
        return {}
    now, before = top1(knn), top1(start)
    if now < before:
        log.warning(
            "k-NN top-1 %.2f is below the %.2f of the --init weights: continued pretraining is "
            "losing what they knew; lower --lr or raise --momentum-teacher",
            now,
            before,
        )
    return {"knn_start": before, "knn_vs_start": now - before}


def log_start(
    knn: dict[str, dict[str, float]] | None, metrics: MetricsFile | None
) -> dict[str, dict[str, float]] | None:
    """Log the k-NN of the --init weights, measured before the first step (None: no labels)."""
    if knn is None:
        return None
    log.info("k-NN of the --init weights before the first step: top-1 %.2f", top1(knn))
    if metrics is not None:
        metrics.write({"iteration": 0, "epoch": 0, "knn_start": top1(knn), "knn": knn})
    return knn
