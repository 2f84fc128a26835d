"""Block masks of patches for iBOT's masked-image-modelling loss, as DINOv2 draws them.

A fraction ``probability`` (0.5) of the global views of a batch get a mask; their masked ratios
are spread evenly over ``ratio`` (0.1 to 0.5 of the patches): view ``j`` of the ``m`` masked ones
draws its ratio uniformly from the ``j``-th of ``m`` equal slices of that range. A mask is made of
rectangular blocks (BEiT's scheme): each block covers at least 4 patches and at most half the
grid, with an aspect ratio log-uniform in [0.3, 1/0.3], and is placed where it adds new masked
patches without passing the target count. The masks are then shuffled over the views.

All randomness comes from the ``numpy.random.Generator`` passed in, so a step's masks are a pure
function of how that generator was seeded.
"""

from __future__ import annotations

import math

import numpy as np

#: DINOv2's defaults: the range of masked ratios and the fraction of global views masked.
MASK_RATIO = (0.1, 0.5)
MASK_PROBABILITY = 0.5
#: Block shape limits (DINOv2's, from BEiT): fewest patches in a block, smallest aspect ratio.
MIN_BLOCK_PATCHES = 4
MIN_ASPECT = 0.3
#: Tries to place one block before giving up on it.
_BLOCK_TRIES = 10


def _add_block(
    mask: np.ndarray, budget: int, rng: np.random.Generator, min_patches: int, min_aspect: float
) -> int:
    """Mask one more block adding between 1 and ``budget`` patches; returns how many it added
    (0 when no try fitted)."""
    height, width = mask.shape
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    for _ in range(_BLOCK_TRIES):
        area = rng.uniform(*sorted((min_patches, budget)))  # budget may be under min_patches
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if h >= height or w >= width:
            continue
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        block = mask[top : top + h, left : left + w]
        added = h * w - int(block.sum())
        if 0 < added <= budget:
            block[...] = True
            return added
    return 0


def block_mask(
    grid: tuple[int, int],
    n_masked: int,
    rng: np.random.Generator,
    max_block: int | None = None,
    min_patches: int = MIN_BLOCK_PATCHES,
    min_aspect: float = MIN_ASPECT,
) -> np.ndarray:
    """A boolean ``[height, width]`` mask of about ``n_masked`` patches in blocks of at most
    ``max_block`` patches (default half the grid). Never more than ``n_masked``; fewer when the
    blocks stop fitting (small grids)."""
    mask = np.zeros(grid, dtype=bool)
    max_block = max_block or (grid[0] * grid[1]) // 2
    count = 0
    while count < n_masked:
        added = _add_block(mask, min(n_masked - count, max_block), rng, min_patches, min_aspect)
        if added == 0:
            break
        count += added
    return mask


def ibot_masks(
    n_views: int,
    grid: tuple[int, int],
    rng: np.random.Generator,
    ratio: tuple[float, float] | list[float] = MASK_RATIO,
    probability: float = MASK_PROBABILITY,
) -> np.ndarray:
    """Masks ``[n_views, height * width]`` (bool, row-major patches) for the global views of a
    batch: ``int(n_views * probability)`` of them masked (see the module docstring), the others
    all False, in shuffled order."""
    n_patches = grid[0] * grid[1]
    n_masked_views = int(n_views * probability)
    bounds = np.linspace(ratio[0], ratio[1], n_masked_views + 1)
    masks = np.zeros((n_views, n_patches), dtype=bool)
    for j in range(n_masked_views):
        target = int(n_patches * rng.uniform(bounds[j], bounds[j + 1]))
        masks[j] = block_mask(grid, target, rng).reshape(-1)
    return masks[rng.permutation(n_views)]
