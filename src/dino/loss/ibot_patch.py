"""iBOT's masked-image-modelling loss on patch tokens, as DINOv2 uses it.

Some global views have a block of their patches masked for the student (each masked patch's
embedding is replaced by a learned mask token, :mod:`dino.data.masking`). The teacher sees the
unmasked view; at every masked patch its patch output, centered and sharpened (its own EMA center,
or Sinkhorn-Knopp over the masked patches of the global batch), is the target of the student's
output at the same patch. The loss of image ``i`` with masked patches ``M_i`` is the mean over
``M_i`` of ``-sum_k Pt[k] log Ps[k]``; the loss is the sum over images divided by the number of
global views in the batch (those with no masked patch count as zero), as DINOv2 weighs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dino.loss.centering import TeacherCentering


def patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """``1 / |M_i|`` for every masked patch of ``masks`` ``[n_images, n_patches]`` (bool), in
    the order of ``masks.nonzero()``: each image's masked patches weigh 1 together."""
    per_image = 1.0 / masks.sum(dim=1, keepdim=True).clamp_min(1).float()
    return per_image.expand_as(masks)[masks]


class IBOTPatchLoss(TeacherCentering):
    """Args:
    out_dim: K of the patch head.
    student_temp: tau_s (0.1).
    center_momentum: EMA momentum of the patch center (0.9).
    centering: ``ema`` or ``sinkhorn``.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "ema",
    ) -> None:
        super().__init__(out_dim, center_momentum, centering)
        self.student_temp = student_temp

    def targets(self, teacher_patch_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The targets ``[M, K]`` of the teacher's outputs ``[M, K]`` at the masked patches.

        The EMA center follows the mean output over this process's masked patches, averaged
        over the processes (DINOv2's definition)."""
        out = teacher_patch_out.detach()
        mean = out.float().sum(dim=0, keepdim=True) / max(out.shape[0], 1)
        probs, _ = self.teacher_probs(out, teacher_temp, center_rows=mean)
        return probs

    def forward(
        self,
        student_patch_out: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        n_images: int,
    ) -> torch.Tensor:
        """``student_patch_out``, ``targets``: ``[M, K]`` at the masked patches; ``weights``
        ``[M]`` from :func:`patch_weights`; ``n_images``: the number of global views."""
        log_s = F.log_softmax(student_patch_out.float() / self.student_temp, dim=-1)
        per_patch = (targets * log_s).sum(dim=-1)
        return -(per_patch * weights).sum() / n_images
