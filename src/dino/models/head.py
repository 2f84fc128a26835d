"""The DINO projection head (docs/recipe.md, "Networks")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP ``in_dim -> hidden -> hidden -> bottleneck``, L2-normalize, weight-normalized linear.

    Args:
        in_dim: backbone feature size.
        out_dim: K, the number of prototypes (65536 in the paper).
        hidden_dim: width of the hidden layers (2048).
        bottleneck_dim: size before the last layer (256).
        nlayers: number of linear layers of the MLP (3).
        use_bn: BatchNorm after the hidden linears (off for ViTs, on for ResNet-50).
        norm_last_layer: freeze the weight norm (``g``) of the last layer at 1. Turning it off
            learns faster for ViT-S but can make training unstable.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1)
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers.append(nn.Linear(d_in, d_out))
            if use_bn:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.GELU())
        layers.append(nn.Linear(dims[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        # created after the truncated-normal init of the MLP, so that, as in the reference
        # code, the last layer keeps nn.Linear's default (uniform) init of its directions
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        # The prototypes' logits are divided by temperatures as low as 0.04: compute them in
        # fp32 even under autocast (bf16 keeps 3 significant digits). The layer is small.
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(x.float())
