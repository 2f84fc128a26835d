"""``dino duplicates``: groups of near-duplicate images within one folder.

Two images are near-duplicates when the cosine similarity of their [CLS] features reaches the
threshold; a group is a connected set of such pairs (union-find), so a chain of edits of one
image is one group. The similarities are computed block by block (``block`` rows against all
later rows), so memory stays ``block x N`` and 200 000 images never need an N x N matrix.

The default threshold was chosen by measurement (``benchmarks/duplicates.py``, docs/folders.md):
on 2 000 distinct images and 200 edited copies (crops, rescales, JPEG re-encodes, colour shifts)
it gave the best F1 of precision and recall with the built-in Fashion-MNIST run's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

#: The default cosine similarity from which two images count as near-duplicates.
DEFAULT_THRESHOLD = 0.93
#: Rows of the similarity computed at once (memory: ``BLOCK x N`` floats).
BLOCK = 1024


def similar_pairs(
    x: np.ndarray,
    threshold: float,
    block: int = BLOCK,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(i, j, similarity)`` arrays of the pairs ``i < j`` of unit rows of ``x`` whose dot
    product is at least ``threshold``, one block of rows ``i`` at a time."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    for start in range(0, len(t), block):
        rows = t[start : start + block]
        sims = rows @ t[start:].T  # this block against itself and the later rows
        sims.triu_(1)  # keep j > i: row r of the block is image start + r, column c: start + c
        i, j = torch.nonzero(sims >= threshold, as_tuple=True)
        yield (i + start).numpy(), (j + start).numpy(), sims[i, j].numpy()
        if progress:
            progress(len(rows))


class UnionFind:
    """Disjoint sets of ``0 .. n-1`` (path halving, union by size)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return int(a)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


def duplicate_groups(
    x: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    block: int = BLOCK,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """The groups (two images or more) of near-duplicate unit rows of ``x``: each group's rows
    in increasing order, groups by their first row."""
    sets = UnionFind(len(x))
    for i, j, _ in similar_pairs(x, threshold, block, progress):
        for a, b in zip(i.tolist(), j.tolist(), strict=True):
            sets.union(a, b)
    roots = np.array([sets.find(a) for a in range(len(x))])
    order = np.argsort(roots, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(roots[order])) + 1)
    return sorted((g for g in groups if len(g) > 1), key=lambda g: int(g[0]))
