"""The DINO loss: cross-entropy between the centered, sharpened teacher and the student.

For teacher global view ``i`` and student view ``v != i`` the pair loss is
``-sum_k Pt_i[k] log Ps_v[k]`` averaged over the batch; the loss is the mean over all
``n_global * n_views - n_global`` pairs. Every view's log-softmax is computed once and the sum
over pairs is one inner product: ``<sum_i Pt_i, sum_v log Ps_v> - sum_i <Pt_i, log Ps_i>``.
That sum splits over any partition of the student views (:meth:`DINOLoss.student_term`): the
training step backpropagates the global and the local views one after the other, so that only
one resolution's activations are alive at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class LossStats:
    """Collapse diagnostics of one step (RECIPE.md): uniform output has entropy log K and KL 0;
    one dominating dimension has entropy 0 and KL 0. ``batch_entropy`` is the entropy of the
    teacher distribution averaged over the batch: near log K while samples use different
    dimensions, it falls with the per-sample entropy when one dimension dominates them all."""

    teacher_entropy: torch.Tensor
    kl: torch.Tensor
    batch_entropy: torch.Tensor | None = None


@dataclass
class TeacherTargets:
    """The teacher side of one step: ``probs`` ``[G, B, K]``, their sum over the views
    ``[B, K]``, and the collapse statistics that depend on the teacher alone."""

    probs: torch.Tensor
    probs_sum: torch.Tensor
    entropy: torch.Tensor
    batch_entropy: torch.Tensor

    def stats(self, loss: torch.Tensor) -> LossStats:
        """The statistics of a step whose (whole) loss is ``loss``."""
        return LossStats(self.entropy, loss - self.entropy, self.batch_entropy)


class DINOLoss(nn.Module):
    """Args:
    out_dim: K.
    n_global: number of views the teacher sees (2).
    student_temp: tau_s (0.1).
    center_momentum: EMA momentum of the center (0.9).
    """

    def __init__(
        self,
        out_dim: int,
        n_global: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: tuple[torch.Tensor, int, object] | None = None

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float
    ) -> tuple[torch.Tensor, LossStats]:
        """``student_out``: ``[V*B, K]`` (view-major), ``teacher_out``: ``[G*B, K]``."""
        targets = self.targets(teacher_out, teacher_temp)
        n_views = student_out.shape[0] // targets.probs.shape[1]
        loss = self.student_term(student_out, targets, 0, n_views)
        return loss, targets.stats(loss.detach())

    def targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> TeacherTargets:
        """The centered, sharpened teacher distributions of a step (and its center update)."""
        self.apply_center_update()
        t_logits = (teacher_out.detach().float() - self.center) / teacher_temp
        t = F.softmax(t_logits, dim=-1).unflatten(0, (self.n_global, -1))  # [G, B, K]
        with torch.no_grad():
            log_t = F.log_softmax(t_logits, dim=-1).unflatten(0, (self.n_global, -1))
            entropy = -(t * log_t).sum(-1).mean()
            mean_t = t.mean(1)  # [G, K]
            batch_entropy = -(mean_t * mean_t.clamp_min(1e-30).log()).sum(-1).mean()
        self._start_center_update(teacher_out.detach())
        return TeacherTargets(t, t.sum(0), entropy, batch_entropy)

    def student_term(
        self, student_out: torch.Tensor, targets: TeacherTargets, first_view: int, n_views: int
    ) -> torch.Tensor:
        """The loss terms of the student views ``first_view, first_view + 1, ..`` (their outputs
        ``[v*B, K]``, view-major) out of ``n_views``: the terms of a partition of the views add
        up to the loss, so each part can be backpropagated on its own."""
        batch = targets.probs.shape[1]
        s = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        s = s.unflatten(0, (-1, batch))  # [v, B, K]
        n_pairs = self.n_global * n_views - min(self.n_global, n_views)
        cross = (targets.probs_sum * s.sum(0)).sum()
        own = max(0, min(self.n_global - first_view, s.shape[0]))  # views the teacher saw too
        if own:
            cross = cross - (targets.probs[first_view : first_view + own] * s[:own]).sum()
        return -cross / (batch * n_pairs)

    @torch.no_grad()
    def _start_center_update(self, teacher_out: torch.Tensor) -> None:
        """Start summing the teacher outputs over the global batch (async all-reduce)."""
        total = teacher_out.float().sum(dim=0, keepdim=True)
        count = teacher_out.shape[0]
        handle = None
        if dist.is_available() and dist.is_initialized():
            handle = dist.all_reduce(total, async_op=True)
            count *= dist.get_world_size()
        self._pending = (total, count, handle)

    def discard_center_update(self) -> None:
        """Forget the pending center update (the training loop skips a non-finite step)."""
        if self._pending is not None and self._pending[2] is not None:
            self._pending[2].wait()  # type: ignore[attr-defined]
        self._pending = None

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """``c <- m c + (1 - m) mean(teacher outputs)``; waits for the all-reduce if needed."""
        if self._pending is None:
            return
        total, count, handle = self._pending
        if handle is not None:
            handle.wait()
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
        self._pending = None
