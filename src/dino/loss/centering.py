"""How the teacher's logits become targets: EMA centering (DINO) or Sinkhorn-Knopp (DINOv2).

Both keep the teacher from collapsing to one prototype, which sharpening alone would do:

* ``ema`` (the DINO paper): subtract a center ``c``, an exponential moving average of the
  teacher's mean output over the global batch, then softmax at temperature ``tau_t``. The new
  batch's mean enters ``c`` only after this step's targets are made (its all-reduce overlaps the
  student's forward).
* ``sinkhorn`` (DINOv2's ``sinkhorn_knopp_teacher``, from SwAV): ``exp(logits / tau_t)`` made a
  joint distribution over (sample, prototype), then alternately rescaled so that every prototype
  gets ``1/K`` of the mass and every sample ``1/N``, for 3 iterations, the sample normalization
  last; returned per sample (each row sums to 1). The sums run over the global batch (all-reduced
  when ``torch.distributed`` is initialized), so the targets of N samples split over processes
  are those of one process holding all of them. No state.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

#: The teacher centerings ``--centering`` accepts.
CENTERINGS = ("ema", "sinkhorn")
#: Sinkhorn-Knopp iterations (DINOv2's value).
SINKHORN_ITERATIONS = 3


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _global_logsumexp(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``log sum exp x`` over ``dim`` (None: all elements) and over the processes."""
    top = x.amax() if dim is None else x.amax(dim=dim, keepdim=True)
    if _distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    total = torch.exp(x - top).sum() if dim is None else torch.exp(x - top).sum(dim, True)
    if _distributed():
        dist.all_reduce(total)
    return top + total.log()


@torch.no_grad()
def sinkhorn_knopp_log(
    logits: torch.Tensor, temperature: float, n_iterations: int = SINKHORN_ITERATIONS
) -> torch.Tensor:
    """The logarithms of the Sinkhorn-Knopp targets ``[N, K]`` of the teacher logits ``[N, K]``
    of this process's samples (see the module docstring).

    Computed in the log domain: the same numbers as rescaling ``exp(logits / temperature)``
    (DINOv2's way), but a sharp teacher (logits spread over more than ~3.5 at temperature 0.04)
    can neither overflow ``exp`` nor underflow whole rows or columns to zero.
    """
    log_q = logits.float() / temperature
    n = torch.tensor(float(log_q.shape[0]), device=log_q.device)
    if _distributed():
        dist.all_reduce(n)
    log_n, log_k = n.log(), math.log(log_q.shape[1])
    log_q = log_q - _global_logsumexp(log_q, None)  # a joint distribution over the global batch
    for _ in range(n_iterations):
        log_q = log_q - _global_logsumexp(log_q, 0) - log_k  # each prototype: 1/K of the mass
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_n  # each sample: 1/N
    return log_q + log_n  # each sample's row: a distribution over the prototypes


def sinkhorn_knopp(
    logits: torch.Tensor, temperature: float, n_iterations: int = SINKHORN_ITERATIONS
) -> torch.Tensor:
    """Sinkhorn-Knopp targets ``[N, K]``: each row a distribution over the K prototypes, the
    prototypes sharing the global batch's mass evenly (exactly so as the iterations go on)."""
    return sinkhorn_knopp_log(logits, temperature, n_iterations).exp()


class TeacherCentering(nn.Module):
    """The teacher side of a loss with a center: ``center`` (a buffer, the EMA center) and the
    two ways of turning teacher logits into target distributions (:meth:`teacher_probs`).

    Args:
        out_dim: K.
        center_momentum: EMA momentum of the center (0.9); used by ``ema`` only.
        centering: ``ema`` or ``sinkhorn``.
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9, centering: str = "ema") -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: tuple[torch.Tensor, int, object] | None = None

    @torch.no_grad()
    def teacher_probs(
        self, logits: torch.Tensor, temperature: float, center_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets ``[N, K]`` of the teacher ``logits`` ``[N, K]`` and their logarithms.

        With ``ema`` the pending center update is applied first and this batch's is started
        from ``center_rows`` (default: ``logits``; the center follows the mean of those rows
        over the global batch)."""
        if self.centering == "sinkhorn":
            log_probs = sinkhorn_knopp_log(logits, temperature)
            return log_probs.exp(), log_probs
        self.apply_center_update()
        z = (logits.float() - self.center) / temperature
        probs, log_probs = F.softmax(z, dim=-1), F.log_softmax(z, dim=-1)
        self._start_center_update(logits if center_rows is None else center_rows)
        return probs, log_probs

    @torch.no_grad()
    def _start_center_update(self, rows: torch.Tensor) -> None:
        """Start summing ``rows`` over the global batch (async all-reduce)."""
        total = rows.float().sum(dim=0, keepdim=True)
        count = rows.shape[0]
        handle = None
        if _distributed():
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
        """``c <- m c + (1 - m) mean(rows)``; waits for the all-reduce if needed."""
        if self._pending is None:
            return
        total, count, handle = self._pending
        if handle is not None:
            handle.wait()
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
        self._pending = None
