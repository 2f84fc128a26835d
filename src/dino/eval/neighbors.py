"""Weighted k-NN classification of features (docs/recipe.md, "Evaluation protocols").

Each of the k nearest bank features (cosine similarity of L2-normalized features) votes for its
label with weight ``exp(sim / T)``; the class with the largest total wins. Queries are processed
in chunks so the similarity matrix never holds more than ``chunk x bank`` entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def weighted_knn(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    ks: tuple[int, ...] | list[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
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
        sims, idx = (q @ bank.T).topk(kmax, dim=1)  # sorted, largest first
        weights = (sims / temperature).exp()
        neighbors = bank_labels[idx]  # [b, kmax]
        for k in ks:
            votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
            votes.scatter_add_(1, neighbors[:, :k], weights[:, :k])
            top = votes.topk(min(5, num_classes), dim=1).indices
            correct[k][0] += int((top[:, 0] == y).sum())
            correct[k][1] += int((top == y[:, None]).any(1).sum())
    n = query.shape[0]
    return {
        str(k): {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n} for k, (c1, c5) in correct.items()
    }
