"""DINOv2's additions to the training step, each off by default (docs/dinov2.md):

* KoLeo (``--koleo-weight``): :func:`~dino.loss.koleo.koleo_loss` of the student's [CLS]
  features, once per global view over this process's batch, the two added;
* iBOT (``--ibot-weight``): block masks on the student's global views
  (:mod:`dino.data.masking`), the teacher's patch outputs there as targets
  (:class:`~dino.loss.ibot_patch.IBOTPatchLoss`, with its own center).

Sinkhorn-Knopp centering (``--centering sinkhorn``) lives in the losses and register tokens
(``--registers``) in the backbone: neither needs anything here. A step's masks are a pure
function of (seed, iteration, process), so a resumed run draws the masks an uninterrupted run
would.
"""

from __future__ import annotations

import numpy as np
import torch

from dino.config import Config
from dino.data.masking import ibot_masks
from dino.data.seeding import sample_keys
from dino.loss import IBOTPatchLoss, koleo_loss
from dino.loss.ibot_patch import patch_weights
from dino.models.multicrop import MultiCropOutput

_MASK_STREAM = 0x5EED_0002


class Additions:
    """The KoLeo and iBOT terms of a run's steps (with neither on, :attr:`active` is False and
    the step is DINO's alone)."""

    def __init__(self, cfg: Config, rank: int, device: torch.device) -> None:
        lo, m = cfg.loss, cfg.model
        self.koleo_weight = lo.koleo_weight
        self.ibot_weight = lo.ibot_weight
        self.mask_ratio = tuple(lo.ibot_mask_ratio)
        self.mask_probability = lo.ibot_mask_probability
        self.grid = (cfg.data.global_size // m.patch_size,) * 2
        self.seed, self.rank, self.device = cfg.run.seed, rank, device
        self.ibot_loss: IBOTPatchLoss | None = None
        if self.ibot_weight > 0:
            self.ibot_loss = IBOTPatchLoss(
                m.out_dim, lo.student_temp, lo.center_momentum, lo.centering
            ).to(device)

    @property
    def active(self) -> bool:
        return self.koleo_weight > 0 or self.ibot_loss is not None

    def masks(self, iteration: int, batch: int) -> torch.Tensor | None:
        """iBOT's masks ``[2 * batch, N]`` of this process's global views (view-major), or None
        without iBOT."""
        if self.ibot_loss is None:
            return None
        key = sample_keys(self.seed, iteration, np.array([self.rank]), stream=_MASK_STREAM)[0]
        rng = np.random.default_rng(int(key))
        masks = ibot_masks(2 * batch, self.grid, rng, self.mask_ratio, self.mask_probability)
        return torch.from_numpy(masks).to(self.device)

    def patch_targets(
        self, teacher_out: MultiCropOutput, temperature: float
    ) -> torch.Tensor | None:
        """The teacher's targets at the masked patches (and the patch center's update)."""
        if self.ibot_loss is None or teacher_out.patch_logits is None:
            return None
        return self.ibot_loss.targets(teacher_out.patch_logits, temperature)

    def loss(
        self,
        student_out: MultiCropOutput,
        batch: int,
        patch_targets: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the terms of the student's global views (the first ``2 *
        batch`` rows of ``student_out``), and each term's unweighted value (detached) to log:
        ``koleo`` (the mean over the two views) and ``ibot``."""
        total = torch.zeros((), device=student_out.logits.device)
        logged: dict[str, torch.Tensor] = {}
        if self.koleo_weight > 0:
            global_views = student_out.features[: 2 * batch].chunk(2)
            koleo = sum(koleo_loss(f) for f in global_views)
            total = total + self.koleo_weight * koleo
            logged["koleo"] = koleo.detach() / 2
        if self.ibot_loss is not None and masks is not None and patch_targets is not None:
            assert student_out.patch_logits is not None
            ibot = self.ibot_loss(
                student_out.patch_logits, patch_targets, patch_weights(masks), masks.shape[0]
            )
            total = total + self.ibot_weight * ibot
            logged["ibot"] = ibot.detach()
        return total, logged

    def discard_center_update(self) -> None:
        if self.ibot_loss is not None:
            self.ibot_loss.discard_center_update()

    def apply_center_update(self) -> None:
        if self.ibot_loss is not None:
            self.ibot_loss.apply_center_update()
