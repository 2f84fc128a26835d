"""Few-label evaluation: seeded labeled subsets (``--labels-per-class``, ``--label-seeds``) for
k-NN banks and linear probes, and the mean and spread over subsets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino.cli import main
from dino.data.datasets import ImageFiles, TensorImages
from dino.errors import DinoError
from dino.eval.api import knn_eval
from dino.eval.labels import (
    check_label_args,
    labeled_subset,
    mean_spread,
    per_class_indices,
    take,
)
from dino.eval.linear import linear_probe_seeds
from dino.eval.views import open_labeled

LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 2, 1, 0, 0])  # 7 / 5 / 6 images


def test_per_class_indices_draw_n_of_every_class_by_seed() -> None:
    idx = per_class_indices(LABELS, 3, seed=0)
    assert np.bincount(LABELS[idx]).tolist() == [3, 3, 3]
    assert len(set(idx.tolist())) == 9 and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, per_class_indices(LABELS, 3, seed=0))  # a function of the seed
    others = [per_class_indices(LABELS, 3, seed=s) for s in range(1, 6)]
    assert any(not np.array_equal(idx, o) for o in others)
    # nested: one seed's 1 and 2 per class are part of its 3 per class
    for n in (1, 2):
        assert set(per_class_indices(LABELS, n, 0)) <= set(idx.tolist())
    # a class with fewer images than asked gives them all
    assert np.bincount(LABELS[per_class_indices(LABELS, 6, 0)]).tolist() == [6, 5, 6]


def test_take_keeps_images_and_labels_together(tmp_path) -> None:
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 2).clone()
    ds = TensorImages(images, torch.tensor([0, 1, 0, 1, 0, 1]), ["a", "b"], "t")
    sub = take(ds, np.array([1, 4]))
    assert sub.images[:, 0, 0, 0].tolist() == [1, 4] and sub.labels.tolist() == [1, 0]
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            (tmp_path / c / f"{i}.png").write_bytes(b"")
    files = ImageFiles(tmp_path)
    picked = labeled_subset(files, 2, seed=3)
    assert len(picked) == 4 and sorted(np.bincount(picked.labels).tolist()) == [2, 2]
    assert all(str(tmp_path) in picked.files[i] for i in range(4))


def test_label_arguments_a_user_can_get_wrong() -> None:
    assert check_label_args(10, [3, 1]) == [3, 1]
    with pytest.raises(DinoError, match="needs --labels-per-class"):
        check_label_args(0, [0, 1])
    with pytest.raises(DinoError, match="repeats"):
        check_label_args(5, [1, 1])
    with pytest.raises(DinoError, match="0 \\(all labels\\) or more"):
        check_label_args(-1, [0])


def test_mean_spread_is_the_sample_standard_deviation() -> None:
    s = mean_spread([80.0, 82.0, 84.0])
    assert (s["mean"], s["std"], s["min"], s["max"]) == (82.0, 2.0, 80.0, 84.0)
    assert mean_spread([5.0])["std"] == 0.0


def test_knn_with_one_label_per_class_votes_for_the_nearest_labeled_image() -> None:
    """k = 1 on raw pixels: each query takes the class of its most similar image among the
    seed's one-per-class bank, computed here by brute force."""
    flat = nn.Flatten()
    res = knn_eval(flat, "fashion-mnist", ks=[1], subset=400, labels_per_class=1,
                   label_seeds=[0, 1, 2], device="cpu")  # fmt: skip
    assert res["n_train"] == 10 and res["labels_per_class"] == 1
    train, val = open_labeled("fashion-mnist", 400)
    mean, std = 0.286, 0.353  # the built-in data's eval view: no resize, its statistics
    q = F.normalize(((val.images.float() / 255 - mean) / std).flatten(1), dim=1)
    tops = []
    for run in res["per_seed"]:
        idx = per_class_indices(train.labels.numpy(), 1, run["seed"])
        bank = F.normalize(((train.images[idx].float() / 255 - mean) / std).flatten(1), dim=1)
        pred = train.labels[idx][(q @ bank.T).argmax(1)]
        top1 = 100.0 * float((pred == val.labels).float().mean())
        assert run["knn"]["1"]["top1"] == pytest.approx(top1, abs=0.26)  # a tie or two
        tops.append(run["knn"]["1"]["top1"])
    assert res["knn"]["1"]["top1"] == pytest.approx(np.mean(tops))
    assert res["knn"]["1"]["top1_std"] == pytest.approx(np.std(tops, ddof=1))
    assert len(set(tops)) > 1  # different banks, different results


def test_knn_caps_k_at_the_bank_size() -> None:
    res = knn_eval(nn.Flatten(), "fashion-mnist", ks=[5, 20, 200], subset=300,
                   labels_per_class=2, device="cpu")  # fmt: skip
    assert list(res["knn"]) == ["5", "20"]  # 20 images: k = 200 becomes 20


def test_linear_probe_over_label_seeds(tmp_path) -> None:
    pixels = nn.Flatten()
    pixels.embed_dim = 3 * 28 * 28  # a backbone states its feature size
    res = linear_probe_seeds(
        pixels, "fashion-mnist", labels_per_class=5, label_seeds=[0, 1],
        output_dir=tmp_path, cached=True, epochs=3, subset=300, device="cpu",
    )  # fmt: skip
    assert [r["seed"] for r in res["per_seed"]] == [0, 1]
    assert all(r["n_train"] == 50 for r in res["per_seed"])
    assert res["top1"] == pytest.approx(np.mean([r["top1"] for r in res["per_seed"]]))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["label_seeds"] == [0, 1] and "top1_std" in saved
    assert (tmp_path / "label-seed-1" / "results.json").exists()


def test_cli_rejects_label_seeds_without_labels_per_class(capsys) -> None:
    rc = main(["knn", "--weights", "random", "--arch", "vit_pico", "--patch-size", "7",
               "--subset", "50", "--label-seeds", "0", "1"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --labels-per-class" in err[0]
