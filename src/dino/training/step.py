"""One DINO training step, :func:`train_step`, read top to bottom as in nanoGPT's ``train.py``.

The loss (Caron et al. 2021, eq. 1 and docs/recipe.md, "Loss") is the cross-entropy between the
teacher's sharpened, centered output on the two global views and the student's output on every
other view. The student learns by gradient descent; the teacher is an exponential moving average
(EMA) of the student; the center is an EMA of the teacher's batch outputs. DINOv2's KoLeo and
iBOT terms join the loss of the student's global views when they are on
(:mod:`dino.training.additions`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dino.data.seeding import sample_keys
from dino.loss.dino_clstoken import TeacherTargets
from dino.models.multicrop import same_size_runs
from dino.training.distributed import all_mean
from dino.training.learner import Learner
from dino.training.schedules import StepValues


def train_step(m: Learner, views: list[torch.Tensor], v: StepValues) -> dict[str, Any]:
    """One optimization step of ``m`` on a batch of multi-crop ``views`` (the two global views
    first) with this step's values ``v``. Returns the step's statistics, or ``{"skipped":
    reason}`` when the loss or a gradient was not finite: then nothing changes (weights,
    optimizer, teacher, center), except that an fp16 loss scale is lowered.

    With ``m.accumulate`` = N the batch is cut into N parts whose gradients add up before the
    one optimizer step: the teacher sees the whole batch (no gradients, so no activations kept),
    the student one part at a time, each part's loss weighted 1/N."""
    for group in m.optimizer.param_groups:  # this iteration's schedules
        group["lr"] = v.lr
        if group["apply_wd"]:
            group["weight_decay"] = v.weight_decay
    x = m.additions  # DINOv2's KoLeo and iBOT terms (inactive: the step is DINO's alone)
    masks = x.masks(v.iteration, views[0].shape[0])  # iBOT's masked patches of the global views
    with m.autocast(), torch.no_grad():  # teacher: global views only
        teacher_out = m.teacher(views[:2], masks, mask_input=False, detailed=True)
    targets = m.loss_fn.targets(teacher_out.logits, v.teacher_temp)
    patch_targets = x.patch_targets(teacher_out, v.teacher_temp)
    m.optimizer.zero_grad(set_to_none=True)
    loss, extras = torch.zeros((), device=targets.probs.device), {}
    for k, (part, part_targets) in enumerate(micro_batches(views, targets, m.accumulate)):
        last = k == m.accumulate - 1
        part_loss, part_extras = student_backward(m, part, part_targets, masks, patch_targets, last)
        loss = loss + part_loss / m.accumulate
        extras = {n: extras.get(n, 0) + e / m.accumulate for n, e in part_extras.items()}
    stats = targets.stats(loss)
    m.scaler.unscale_(m.optimizer)  # a no-op without fp16 loss scaling
    grads = [p.grad for p in m.params if p.grad is not None]
    norms = list(torch._foreach_norm(grads)) if grads else []
    skipped = non_finite(loss + sum(extras.values()), norms, m.world)
    if skipped:  # every process takes the same decision
        m.loss_fn.discard_center_update()
        x.discard_center_update()
        if m.scaler.is_enabled():
            m.scaler.update()  # lowers the loss scale
        m.optimizer.zero_grad(set_to_none=True)
        return {"skipped": skipped}
    if m.clip_grad > 0:
        clip_per_parameter(m.params, m.clip_grad, norms)
    if v.freeze_last_layer:  # the head's last layer waits
        for p in m.last_layer:
            p.grad = None
    m.scaler.step(m.optimizer)
    m.scaler.update()
    ema_update(m.teacher, m.student, v.momentum)
    m.loss_fn.apply_center_update()
    x.apply_center_update()
    return summary(loss, stats, m.world, extras)


def student_backward(
    m: Learner,
    views: list[torch.Tensor],
    targets: TeacherTargets,
    masks: torch.Tensor | None,
    patch_targets: torch.Tensor | None,
    last: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backpropagate the student's loss on ``views`` (weighted ``1 / m.accumulate``); returns
    the (unweighted, detached) DINO loss and the additions' terms.

    The student's views go one resolution at a time, each part backpropagated before the next
    part's forward: the loss is a sum over views, and one resolution's activations are alive at
    a time instead of all of them. DDP averages the gradients on the ``last`` batch's last part.
    """
    parts = student_parts(m, views)
    loss, extras = torch.zeros((), device=targets.probs.device), {}
    for k, (first, end) in enumerate(parts):
        no_sync = getattr(m.student_ddp, "no_sync", None)
        sync = last and k == len(parts) - 1
        with nullcontext() if sync or no_sync is None else no_sync():
            with m.autocast():
                out = m.student_ddp(views[first:end], masks if first == 0 else None, detailed=True)
                part, added = m.loss_fn.student_term(out.logits, targets, first, len(views)), None
                if first == 0 and m.additions.active:  # KoLeo and iBOT: terms of global views
                    added, extras = m.additions.loss(out, views[0].shape[0], patch_targets, masks)
            total = part if added is None else part + added
            m.scaler.scale(total if m.accumulate == 1 else total / m.accumulate).backward()
        loss = loss + part.detach()
    return loss, extras


def micro_batches(
    views: list[torch.Tensor], targets: TeacherTargets, n: int
) -> list[tuple[list[torch.Tensor], TeacherTargets]]:
    """The ``n`` accumulated batches: each one's views and teacher targets (``n`` = 1: the
    batch itself)."""
    if n == 1:
        return [(views, targets)]
    batch = views[0].shape[0]
    if batch % n:
        raise ValueError(f"a batch of {batch} does not split into {n} equal parts")
    out = []
    for rows in (slice(i * batch // n, (i + 1) * batch // n) for i in range(n)):
        probs = targets.probs[:, rows]
        part = TeacherTargets(probs, probs.sum(0), targets.entropy, targets.batch_entropy)
        out.append(([view[rows] for view in views], part))
    return out


def student_parts(m: Learner, views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``(first, end)`` of each run of same-sized views; all views at once when the head has
    BatchNorm (its statistics are over all views, as in the reference code). With iBOT the global
    views come last: DDP averages the gradients on the last part, which must then use every
    parameter (the mask token and the patch head serve the global views only)."""
    parts = [(0, len(views))] if m.head_has_bn else same_size_runs(views)
    return parts[1:] + parts[:1] if m.additions.ibot_loss is not None else parts


def non_finite(loss: torch.Tensor, norms: list[torch.Tensor], world: int) -> str | None:
    """Why the step must be skipped (a loss or gradient that is not finite on any process), or
    None. ``norms``: the gradient norms."""
    loss_finite = torch.isfinite(loss.detach()).all()
    grads_finite = torch.isfinite(torch.stack(norms)).all() if norms else loss_finite
    finite = torch.stack([loss_finite, grads_finite]).to(torch.float32)
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    loss_ok, grads_ok = (bool(v) for v in finite.tolist())
    if not loss_ok:
        return "non-finite loss"
    return None if grads_ok else "non-finite gradient"


def summary(
    loss: torch.Tensor, stats: Any, world: int, extras: dict[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """The step's (DINO) loss and teacher statistics, then the additions' terms (``koleo``,
    ``ibot``), averaged over the processes (the global batch's values, as one process would
    log them)."""
    values = [loss.detach(), stats.teacher_entropy, stats.kl]
    names = ["loss", "teacher_entropy", "kl"]
    if stats.batch_entropy is not None:
        values.append(stats.batch_entropy)
        names.append("batch_entropy")
    for name, value in (extras or {}).items():
        values.append(value)
        names.append(f"{name}_loss")
    numbers = torch.stack([v.float() for v in values])
    if world > 1:
        numbers = all_mean(numbers)
    return dict(zip(names, numbers.tolist(), strict=True))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_s`` for every parameter, in one foreach call."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


@torch.no_grad()
def clip_per_parameter(
    params: list[torch.Tensor], max_norm: float, norms: list[torch.Tensor] | None = None
) -> None:
    """Scale each parameter's gradient to norm at most ``max_norm`` (the reference's clipping).

    ``norms``: the gradient norms of the parameters that have a gradient, if already computed.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if norms is None:
        norms = torch._foreach_norm(grads)
    scale = torch.clamp(max_norm / (torch.stack(list(norms)) + 1e-6), max=1.0)
    # Only the gradients above the limit are rewritten (one host sync to find them): scaling
    # all of them by mostly 1.0 was a pass over the whole model (benchmarks/step_parts.py).
    clipped = torch.nonzero(scale < 1.0).flatten().tolist()
    if clipped:
        torch._foreach_mul_([grads[i] for i in clipped], list(scale[clipped].unbind()))


_STEP_STREAM = 0x5EED_0001


def step_seed(seed: int, rank: int, iteration: int) -> int:
    """The seed of torch's generator at ``iteration`` on process ``rank``."""
    key = sample_keys(seed, iteration, np.array([rank]), stream=_STEP_STREAM)[0]
    return int(key >> np.uint64(1))
