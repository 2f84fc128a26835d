"""Ranking a database by cosine similarity and scoring the rankings.

Average precision follows the revisitop definition: the area under the precision-recall curve
accumulated as trapezoids, *junk* images removed from the ranking before it is scored, queries
without a positive image left out. Precision@k is either the plain share of relevant images among
the first k or revisitop's mP@k term (precision at ``min(k, rank of the last positive)``).
Scores are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dino.atomic_files import write_csv

#: The k of revisitop's mP@k and of the plain folders' precision@k.
DEFAULT_KS = (1, 5, 10)


def average_precision(positive_ranks: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """AP of one query by revisitop's definition: ``positive_ranks`` are the 0-based ranks of the
    positives found (ascending, junk already removed), ``n_positives`` how many exist; the
    precision-recall curve is integrated with trapezoids of width ``1 / n_positives`` between
    the precision just before and just after each positive."""
    if n_positives <= 0:
        raise ValueError("a query without positives has no average precision")
    ap = 0.0
    for j, rank in enumerate(positive_ranks):
        before = 1.0 if rank == 0 else j / rank
        after = (j + 1) / (rank + 1)
        ap += (before + after) / 2 / n_positives
    return ap


def positive_ranks(order: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives in the ranking ``order`` (database indices, best first)
    once the junk images are taken out of it. ``positives`` and ``junk`` are boolean masks over
    the database (an image in both counts as positive)."""
    keep = ~junk[order] | positives[order]
    return np.flatnonzero(positives[order][keep])


def precision_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of relevant images among the first ``k`` (junk removed), from the ranks of the
    positives."""
    return int(np.count_nonzero(ranks < k)) / k


def revisitop_precision_at_k(ranks: np.ndarray, k: int) -> float:
    """revisitop's mP@k term: precision at ``min(k, 1-based rank of the last positive)``."""
    ranks1 = ranks + 1
    kq = min(int(ranks1.max()), k)
    return int(np.count_nonzero(ranks1 <= kq)) / kq


@dataclass
class QueryTruth:
    """Which database images are positive and which are junk for one query."""

    positives: np.ndarray  # int indices
    junk: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def query_scores(
    orders: np.ndarray,
    truth: Sequence[QueryTruth],
    n_database: int,
    ks: Sequence[int] = DEFAULT_KS,
    revisitop_pk: bool = False,
) -> list[tuple[float, list[float]] | None]:
    """(AP, precision@k for each k) of each ranking ``[Q, N]`` (database indices, best first),
    None for a query without positives. With ``revisitop_pk`` the precision@k is revisitop's
    mP@k, else the plain share of relevant images among the first k."""
    out: list[tuple[float, list[float]] | None] = []
    pk = revisitop_precision_at_k if revisitop_pk else precision_at_k
    for order, t in zip(orders, truth, strict=True):
        if len(t.positives) == 0:
            out.append(None)
            continue
        pos = np.zeros(n_database, dtype=bool)
        pos[t.positives] = True
        junk = np.zeros(n_database, dtype=bool)
        junk[t.junk] = True
        ranks = positive_ranks(order, pos, junk)
        out.append((average_precision(ranks, int(pos.sum())), [pk(ranks, k) for k in ks]))
    return out


def mean_scores(
    per_query: Sequence[tuple[float, list[float]] | None], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, Any]:
    """mAP and mean precision@k over the queries that have positives."""
    scored = [s for s in per_query if s is not None]
    return {
        "mAP": float(np.mean([ap for ap, _ in scored])) if scored else None,
        "precision@k": (
            {
                str(k): float(v)
                for k, v in zip(ks, np.mean([pk for _, pk in scored], axis=0), strict=True)
            }
            if scored
            else None
        ),
        "scored_queries": len(scored),
        "ap": [None if s is None else s[0] for s in per_query],
    }


def score_rankings(
    orders: np.ndarray,
    truth: Sequence[QueryTruth],
    n_database: int,
    ks: Sequence[int] = DEFAULT_KS,
    revisitop_pk: bool = False,
) -> dict[str, Any]:
    """:func:`mean_scores` of :func:`query_scores`: mAP, mean precision@k, each query's AP."""
    return mean_scores(query_scores(orders, truth, n_database, ks, revisitop_pk), ks)


def rank_chunks(
    queries: torch.Tensor,
    database: torch.Tensor,
    exclude: Sequence[int | None] | None = None,
    chunk_elems: int = 1 << 24,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(first query, database indices [b, N] by decreasing cosine similarity, similarities)``
    for blocks of queries, so that memory stays at ``chunk_elems`` similarities.

    ``exclude[q]`` (a database index or None) goes to the end of query q's ranking with
    similarity ``-inf``: an image never retrieves itself."""
    step = max(1, chunk_elems // max(1, database.shape[0]))
    for start in range(0, queries.shape[0], step):
        sim = queries[start : start + step] @ database.T
        if exclude is not None:
            for j, i in enumerate(exclude[start : start + step]):
                if i is not None:
                    sim[j, i] = float("-inf")
        sims, order = sim.sort(dim=1, descending=True)
        yield start, order.numpy(), sims.numpy()


def search(
    queries: torch.Tensor,
    database: torch.Tensor,
    truths: dict[str, Sequence[QueryTruth]],
    ks: Sequence[int],
    topk: int,
    revisitop_pk: bool = False,
    exclude: Sequence[int | None] | None = None,
) -> tuple[dict[str, dict[str, Any]], np.ndarray, np.ndarray]:
    """Rank the database for every query (in blocks) and score each ground truth of
    ``truths``; returns the scores by name and the ``topk`` best (indices, similarities)."""
    per_query: dict[str, list] = {name: [] for name in truths}
    tops, top_sims = [], []
    n = database.shape[0]
    for start, orders, sims in rank_chunks(queries, database, exclude):
        tops.append(orders[:, :topk])
        top_sims.append(sims[:, :topk])
        for name, truth in truths.items():
            block = truth[start : start + len(orders)]
            per_query[name] += query_scores(orders, block, n, ks, revisitop_pk)
    scores = {name: mean_scores(values, ks) for name, values in per_query.items()}
    return scores, np.concatenate(tops), np.concatenate(top_sims)


def write_neighbours(
    path: str | Path,
    query_names: Sequence[str],
    database_names: Sequence[str],
    orders: np.ndarray,
    sims: np.ndarray,
    topk: int,
) -> None:
    """CSV ``query,rank,neighbour,similarity`` with the ``topk`` best of each query."""
    rows = [
        [name, r + 1, database_names[orders[q, r]], f"{sims[q, r]:.6f}"]
        for q, name in enumerate(query_names)
        for r in range(min(topk, orders.shape[1]))
        if np.isfinite(sims[q, r])
    ]
    write_csv(path, ["query", "rank", "neighbour", "similarity"], rows)
