"""Data order: one permutation per epoch, cut into global batches, each split across processes.

The order depends only on (seed, epoch), and global batch ``g`` of an epoch holds the same
samples whatever the number of processes: with ``P`` processes of batch ``B``, rank ``r`` takes
slice ``r`` of size ``B`` of the global batch of size ``P * B``. Resuming mid-epoch skips the
batches already done.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class GlobalBatchSampler:
    """Yields, for one epoch, this rank's list of ``(epoch, index)`` per step.

    Args:
        n: dataset size.
        batch_size: per-process batch.
        world_size, rank: the process group.
        seed: data order seed.
    """

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        self.n, self.batch_size, self.world_size, self.rank, self.seed = (
            n,
            batch_size,
            world_size,
            rank,
            seed,
        )
        self.epoch = 0
        self.start_step = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def indices(self, step: int) -> np.ndarray:
        """The sample indices of this rank at ``step`` of the current epoch."""
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        lo = step * self.global_batch + self.rank * self.batch_size
        return perm[lo : lo + self.batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        for step in range(self.start_step, self.steps_per_epoch()):
            lo = step * self.global_batch + self.rank * self.batch_size
            yield [(self.epoch, int(i)) for i in perm[lo : lo + self.batch_size]]

    def __len__(self) -> int:
        return self.steps_per_epoch() - self.start_step
