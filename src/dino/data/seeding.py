"""Counter-based randomness: every random number is a pure function of (seed, epoch, sample, ...).

Augmentations draw from these instead of a stateful generator, so the views of a sample do not
depend on which process or DataLoader worker makes them, nor on whether the run was resumed.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (a bijection on uint64 with good avalanche)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def sample_keys(
    seed: int, epoch: int, indices: np.ndarray, stream: int | np.ndarray = 0
) -> np.ndarray:
    """One 64-bit key per sample for (seed, epoch, index, stream); an array of streams is
    broadcast against ``indices`` (the keys of several streams of one sample at once)."""
    with np.errstate(over="ignore"):
        k = _mix(np.uint64(seed) + _GOLDEN)
        k = _mix(k ^ np.uint64(epoch))
        k = _mix(k ^ np.uint64(stream))
        return _mix(k ^ np.asarray(indices, dtype=np.uint64))


def uniforms(keys: np.ndarray, n: int) -> np.ndarray:
    """``[len(keys), n]`` floats in [0, 1), the i-th column drawn from counter i of each key."""
    with np.errstate(over="ignore"):
        x = _mix(keys[:, None] + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[None, :])
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for a stateful generator used on one sample (the PIL path)."""
    return int(sample_keys(seed, epoch, np.array([index]))[0] >> np.uint64(1))
