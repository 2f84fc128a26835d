"""Weighted k-NN classification of features (docs/recipe.md, "Evaluation protocols").

Each of the k nearest bank features (cosine similarity of L2-normalized features) votes for its
label with weight ``exp(sim / T)``; the class with the largest total wins. Queries are processed
in chunks so the similarity matrix never holds more than ``chunk x bank`` entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dino.config import KNN_KS, KNN_TEMPERATURE


def votes(
    sims: torch.Tensor,
    idx: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    temperature: float = KNN_TEMPERATURE,
) -> torch.Tensor:
    """``[Q, classes]``: each class's summed vote weights ``exp(sim / T)`` over the neighbours
    ``idx`` (bank rows, ``[Q, k]``) with similarities ``sims``."""
    out = torch.zeros(sims.shape[0], num_classes, device=sims.device)
    return out.scatter_add_(1, bank_labels[idx], (sims / temperature).exp())


@torch.no_grad()
def nearest(bank: torch.Tensor, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities ``[Q, k]`` (largest first) and bank rows of the ``k`` nearest bank
    features of each query; both inputs L2-normalized."""
    return (query @ bank.T).topk(k, dim=1)


@torch.no_grad()
def weighted_knn(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    ks: tuple[int, ...] | list[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk: int = 256,
) -> dict[str, dict[str, float]]:
    """Top-1 and top-5 accuracy (percent) of the weighted k-NN for each k.

    Returns ``{"20": {"top1": ..., "top5": ...}, ...}``. Raises ``ValueError`` for a ``k``
    outside ``[1, len(bank)]`` (callers check it first, in their users' words), rather than
    answering a smaller k under its name.
    """
    if any(not 1 <= int(k) <= bank.shape[0] for k in ks):
        raise ValueError(f"k values must be in [1, {bank.shape[0]}] (the bank), got {list(ks)}")
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    bank_labels = bank_labels.long().to(bank.device)
    query_labels = query_labels.long().to(bank.device)
    num_classes = int(num_classes or int(bank_labels.max()) + 1)
    ks = sorted({int(k) for k in ks})
    kmax = ks[-1]
    correct = {k: [0, 0] for k in ks}
    for start in range(0, query.shape[0], chunk):
        q = query[start : start + chunk].to(bank.device)
        y = query_labels[start : start + chunk]
        sims, idx = nearest(bank, q, kmax)
        for k in ks:
            v = votes(sims[:, :k], idx[:, :k], bank_labels, num_classes, temperature)
            top = v.topk(min(5, num_classes), dim=1).indices
            correct[k][0] += int((top[:, 0] == y).sum())
            correct[k][1] += int((top == y[:, None]).any(1).sum())
    n = query.shape[0]
    return {
        str(k): {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n} for k, (c1, c5) in correct.items()
    }
