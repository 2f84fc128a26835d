"""The losses of a training step, one per file (DINOv2's layout).

* :mod:`~dino.loss.dino_clstoken`: the DINO loss on the [CLS] outputs (:class:`DINOLoss`);
* :mod:`~dino.loss.centering`: how teacher logits become targets (EMA center, Sinkhorn-Knopp);
* :mod:`~dino.loss.koleo`: the KoLeo regularizer on the student's [CLS] features;
* :mod:`~dino.loss.ibot_patch`: iBOT's masked-patch loss (:class:`IBOTPatchLoss`).
"""

from dino.loss.centering import CENTERINGS, TeacherCentering, sinkhorn_knopp
from dino.loss.dino_clstoken import DINOLoss, LossStats, TeacherTargets
from dino.loss.ibot_patch import IBOTPatchLoss
from dino.loss.koleo import koleo_loss

__all__ = [
    "CENTERINGS",
    "DINOLoss",
    "IBOTPatchLoss",
    "LossStats",
    "TeacherCentering",
    "TeacherTargets",
    "koleo_loss",
    "sinkhorn_knopp",
]
