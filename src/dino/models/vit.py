"""Our ViTs: timm's :class:`~timm.models.vision_transformer.VisionTransformer` with the
positional embedding resampled to another patch grid as the reference DINO code does.

The embedding is learned on the grid of the global crops (14x14 for 224 px and patch 16); a
96-px local crop has a 6x6 grid. The reference code (``interpolate_pos_encoding`` in its
``vision_transformer.py``) resamples the grid bicubically with a scale factor of
``(new + 0.1) / old`` per side (the 0.1 keeps the output size from rounding down) and no
antialiasing; timm's own resampling is antialiased and sized by ``new / old``, which gives other
embeddings when shrinking. Matching the reference keeps our features of small crops, and of
reference weights loaded with ``--init``, the reference network's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """``pos_embed`` ``[1, prefix + old_h * old_w, D]`` resampled to ``new_grid`` (rows,
    columns): bicubic, no antialiasing, scale factor ``(new + 0.1) / old`` per side; the first
    ``num_prefix_tokens`` entries ([CLS]) are kept as they are."""
    new_grid, old_grid = tuple(new_grid), tuple(old_grid)
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    scale = tuple((n + 0.1) / o for n, o in zip(new_grid, old_grid, strict=True))
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, grid], dim=1)


class DINOVisionTransformer(VisionTransformer):
    """A timm ViT (built with ``dynamic_img_size=True``) whose positional embedding follows
    :func:`resample_pos_embed` for inputs of another size than ``img_size``."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_img_size or self.pos_embed is None:
            return super()._pos_embed(x)
        b, h, w, c = x.shape  # patch tokens on their grid (dynamic image size)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        n_embedded = 0 if self.no_embed_class else self.num_prefix_tokens
        pos = resample_pos_embed(self.pos_embed, (h, w), self.patch_embed.grid_size, n_embedded)
        x = x.reshape(b, h * w, c)
        if self.no_embed_class:  # prefix tokens without positional embedding (registers)
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        return self.pos_drop(x)
