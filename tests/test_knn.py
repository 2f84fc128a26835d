"""Weighted k-NN (docs/recipe.md, "Evaluation protocols"): each of the k nearest bank features
(cosine) votes for its label with weight exp(sim / T)."""

from __future__ import annotations

import math

import pytest
import torch

from dino.eval.neighbors import weighted_knn


def unit(angle_cos: float, sign: float = 1.0) -> list[float]:
    """A 2-D unit vector whose cosine with (1, 0) is ``angle_cos``."""
    return [angle_cos, sign * math.sqrt(1 - angle_cos**2)]


def test_separable_clusters_give_100_percent() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 16) * 5
    bank = torch.cat([c + 0.1 * torch.randn(10, 16, generator=g) for c in centers])
    bank_labels = torch.arange(4).repeat_interleave(10)
    query = torch.cat([c + 0.1 * torch.randn(5, 16, generator=g) for c in centers])
    query_labels = torch.arange(4).repeat_interleave(5)
    res = weighted_knn(bank, bank_labels, query, query_labels, ks=(1, 5, 10))
    assert set(res) == {"1", "5", "10"}
    for v in res.values():
        assert v["top1"] == pytest.approx(100.0)
        assert v["top5"] == pytest.approx(100.0)


def test_wrong_labels_give_0_percent() -> None:
    bank = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    res = weighted_knn(bank, labels, bank.clone(), torch.tensor([1, 2, 0]), ks=(1,))
    assert res["1"]["top1"] == 0.0


def test_weighting_beats_majority_vote() -> None:
    """One class-0 neighbor at cosine 0.9 against two class-1 neighbors at 0.5:
    exp(0.9 / 0.07) = 3.8e5 > 2 exp(0.5 / 0.07) = 2.5e3, so class 0 wins although a plain
    majority vote (or a very high temperature) picks class 1."""
    bank = torch.tensor([unit(0.9), unit(0.5), unit(0.5, -1.0)])
    bank_labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert math.exp(0.9 / 0.07) > 2 * math.exp(0.5 / 0.07)
    res = weighted_knn(bank, bank_labels, query, torch.tensor([0]), ks=(3,), temperature=0.07)
    assert res["3"]["top1"] == 100.0
    # nearly equal weights: the majority (class 1) wins
    res_flat = weighted_knn(bank, bank_labels, query, torch.tensor([0]), ks=(3,), temperature=100.0)
    assert res_flat["3"]["top1"] == 0.0
    assert res_flat["3"]["top5"] == 100.0  # class 0 is second of two


def test_votes_are_summed_over_neighbors() -> None:
    """One class-0 neighbor at 0.9 against three class-1 neighbors at 0.85:
    3 exp(0.85 / 0.07) = 1.47 exp(0.9 / 0.07), so class 1 wins with k = 4 but class 0 with
    k = 1 (the nearest neighbor alone)."""
    bank = torch.tensor([unit(0.9), unit(0.85), unit(0.85, -1.0), unit(0.85)])
    bank_labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[2.0, 0.0]])  # not unit: features are L2-normalized first
    assert 3 * math.exp(0.85 / 0.07) > math.exp(0.9 / 0.07)
    res = weighted_knn(bank, bank_labels, query, torch.tensor([1]), ks=(1, 4), temperature=0.07)
    assert res["1"]["top1"] == 0.0
    assert res["4"]["top1"] == 100.0
    # with T = 0.02 the single closer neighbor outweighs the three: exp(2.5) = 12.2 > 3
    res_sharp = weighted_knn(bank, bank_labels, query, torch.tensor([1]), ks=(4,), temperature=0.02)
    assert res_sharp["4"]["top1"] == 0.0


def test_k_larger_than_bank_is_refused() -> None:
    """A k the bank cannot answer is an error, not the answer of a smaller k under its name."""
    bank = torch.tensor([unit(0.9), unit(0.5), unit(0.5, -1.0)])
    bank_labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q_labels = torch.tensor([0, 1])
    assert set(weighted_knn(bank, bank_labels, query, q_labels, ks=(1, 3))) == {"1", "3"}
    for ks in ((4,), (3, 100), (0,)):
        with pytest.raises(ValueError, match="the bank"):
            weighted_knn(bank, bank_labels, query, q_labels, ks=ks)


def test_top5_at_least_top1_and_chunking_invariant() -> None:
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(60, 8, generator=g)
    bank_labels = torch.randint(0, 10, (60,), generator=g)
    query = torch.randn(25, 8, generator=g)
    q_labels = torch.randint(0, 10, (25,), generator=g)
    res = weighted_knn(bank, bank_labels, query, q_labels, ks=(1, 5, 20), num_classes=10)
    for v in res.values():
        assert 0.0 <= v["top1"] <= v["top5"] <= 100.0
    chunked = weighted_knn(
        bank, bank_labels, query, q_labels, ks=(1, 5, 20), num_classes=10, chunk=4
    )
    assert chunked == res
    # k = 1 top-1 is the label of the nearest neighbor by cosine
    sims = (
        torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    )
    nn_acc = 100.0 * (bank_labels[sims.argmax(1)] == q_labels).float().mean().item()
    assert res["1"]["top1"] == pytest.approx(nn_acc)
    # k = 20 against the definition, query by query: each of the 20 most similar bank features
    # adds exp(sim / T) to its label's vote; top-1 is the largest vote, top-5 the 5 largest
    top = sims.topk(20, dim=1)
    votes = torch.zeros(25, 10)
    for q in range(25):
        for sim, i in zip(top.values[q].tolist(), top.indices[q].tolist(), strict=True):
            votes[q, bank_labels[i]] += math.exp(sim / 0.07)
    top1 = 100.0 * (votes.argmax(1) == q_labels).float().mean().item()
    top5 = 100.0 * (votes.topk(5, dim=1).indices == q_labels[:, None]).any(1).float().mean().item()
    assert 0.0 < top1 < 100.0  # a case where the vote matters
    assert res["20"]["top1"] == pytest.approx(top1)
    assert res["20"]["top5"] == pytest.approx(top5)
