"""The DINO loss on the [CLS] outputs: cross-entropy between the centered, sharpened teacher
and the student.

For teacher global view ``i`` and student view ``v != i`` the pair loss is
``-sum_k Pt_i[k] log Ps_v[k]`` averaged over the batch; the loss is the mean over all
``n_global * n_views - n_global`` pairs. Every view's log-softmax is computed once and the sum
over pairs is one inner product: ``<sum_i Pt_i, sum_v log Ps_v> - sum_i <Pt_i, log Ps_i>``.
That sum splits over any partition of the student views (:meth:`DINOLoss.student_term`): the
training step backpropagates the global and the local views one after the other, so that only
one resolution's activations are alive at a time. The teacher's targets are EMA-centered
or Sinkhorn-Knopp normalized (:mod:`dino.loss.centering`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dino.loss.centering import TeacherCentering


@dataclass
class LossStats:
    """Collapse diagnostics of one step (docs/recipe.md, "Loss, centering and sharpening"):
    uniform output has entropy log K and KL 0; one dominating dimension has entropy 0 and KL 0.
    ``batch_entropy`` is the entropy of the teacher distribution averaged over the batch: near
    log K while samples use different dimensions, it falls with the per-sample entropy when one
    dimension dominates them all."""

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


class DINOLoss(TeacherCentering):
    """Args:
    out_dim: K.
    n_global: number of views the teacher sees (2).
    student_temp: tau_s (0.1).
    center_momentum: EMA momentum of the center (0.9).
    centering: ``ema`` (the center) or ``sinkhorn`` (:func:`~dino.loss.centering.sinkhorn_knopp`
        over the teacher outputs of all global views of the batch; the center is then unused).
    """

    def __init__(
        self,
        out_dim: int,
        n_global: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "ema",
    ) -> None:
        super().__init__(out_dim, center_momentum, centering)
        self.n_global = n_global
        self.student_temp = student_temp

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
        probs, log_probs = self.teacher_probs(teacher_out.detach(), teacher_temp)
        t = probs.unflatten(0, (self.n_global, -1))  # [G, B, K]
        with torch.no_grad():
            log_t = log_probs.unflatten(0, (self.n_global, -1))
            entropy = -(t * log_t).sum(-1).mean()
            mean_t = t.mean(1)  # [G, K]
            batch_entropy = -(mean_t * mean_t.clamp_min(1e-30).log()).sum(-1).mean()
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
