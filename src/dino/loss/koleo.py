"""The KoLeo regularizer (Sablayrolles et al. 2019, "Spreading vectors for similarity search"),
as DINOv2 adds it to the student's [CLS] features.

For features ``x_1 .. x_n`` (L2-normalized first) it is ``-1/n sum_i log(d_i + eps)``, with
``d_i`` the distance from ``x_i`` to its nearest other feature: the Kozachenko-Leonenko
estimator of the differential entropy up to constants, so lowering it spreads the features
apart in the batch. DINOv2 computes it per process batch, once per global view (the two views
of one image are not each other's neighbours), and adds ``0.1 x`` their sum to the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Added to distances before the logarithm and used in the normalization (DINOv2's value).
KOLEO_EPS = 1e-8


def koleo_loss(features: torch.Tensor, eps: float = KOLEO_EPS) -> torch.Tensor:
    """KoLeo of ``features`` ``[n, D]`` (any scale: they are L2-normalized here), computed in
    float32 whatever the autocast; 0 for fewer than 2 features."""
    if features.shape[0] < 2:
        return features.sum() * 0.0
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            similarity = x @ x.t()
            similarity.fill_diagonal_(float("-inf"))  # a point is not its own neighbour
            nearest = similarity.argmax(dim=1)  # the largest cosine is the smallest distance
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distances + eps).mean()
