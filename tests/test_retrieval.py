"""Image retrieval (``dino retrieval``): revisitop scoring by hand, and retrieval of
scikit-image photos among their transformed copies and distractors."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.commands import RANDOM_PICO, one_error_line, pico, run_cli
from helpers.photos import GREYS, PHOTOS, crop, jpeg, photo
from PIL import Image, ImageEnhance

from dino.errors import DinoError
from dino.eval.global_features import SCALES, global_feature
from dino.eval.ranking import (
    QueryTruth,
    average_precision,
    positive_ranks,
    precision_at_k,
    rank_chunks,
    revisitop_precision_at_k,
    score_rankings,
)
from dino.eval.retrieval import image_retrieval
from dino.eval.revisitop import PROTOCOLS

pytest.importorskip("skimage.data")


def recolour(im: Image.Image) -> Image.Image:
    return ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(1.3)).enhance(0.5)


def transformed(im: Image.Image) -> dict[str, Image.Image]:
    return {"crop": crop(im, 0.7), "jpeg": jpeg(im, 15), "colour": recolour(im)}


def class_folders(root: Path) -> tuple[Path, Path]:
    """queries/<photo>/orig.png and database/<photo>/{crop,jpeg,colour}.png plus distractors."""
    q, db = root / "queries", root / "database"
    for name in PHOTOS:
        im = photo(name)
        (q / name).mkdir(parents=True)
        (db / name).mkdir(parents=True)
        im.save(q / name / "orig.png")
        for kind, t in transformed(im).items():
            t.save(db / name / f"{kind}.png")
    (db / "distractors").mkdir()
    for name in GREYS:
        photo(name).save(db / "distractors" / f"{name}.png")
    return q, db


def revisitop_folder(root: Path) -> Path:
    """A revisitop-shaped data set: roxford5k/gnd_roxford5k.pkl and roxford5k/jpg/*.jpg, the
    queries being the photos, their crop and JPEG copies easy, the recoloured copy hard and a
    grey distractor junk."""
    folder = root / "roxford5k"
    (folder / "jpg").mkdir(parents=True)
    imlist, qimlist, gnd = [], [], []
    for name in GREYS:
        photo(name).save(folder / "jpg" / f"grey_{name}.jpg")
        imlist.append(f"grey_{name}")
    for i, name in enumerate(PHOTOS):
        im = photo(name)
        im.save(folder / "jpg" / f"q_{name}.jpg")
        qimlist.append(f"q_{name}")
        ids = {}
        for kind, t in transformed(im).items():
            t.save(folder / "jpg" / f"{kind}_{name}.jpg")
            ids[kind] = len(imlist)
            imlist.append(f"{kind}_{name}")
        w, h = im.size
        gnd.append(
            {
                "easy": [ids["crop"], ids["jpeg"]],
                "hard": [ids["colour"]],
                "junk": [i % len(GREYS)],
                "bbx": [w * 0.1, h * 0.1, w * 0.9, h * 0.9],
            }
        )
    with open(folder / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return root


# ------------------------------------------------------------------ scores by hand


def test_average_precision_by_hand():
    # positives at ranks 0 and 2 of 2: trapezoids (1 + 1) / 2 / 2 + (1/2 + 2/3) / 2 / 2
    assert average_precision([0, 2], 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    assert average_precision([1], 1) == pytest.approx((0 + 1 / 2) / 2)
    assert average_precision([0], 2) == pytest.approx(0.5)  # the other positive never found
    assert average_precision([0, 1, 2], 3) == 1.0
    with pytest.raises(ValueError):
        average_precision([], 0)


def test_junk_images_are_taken_out_of_the_ranking():
    # database: 0 positive, 1 junk, 2 negative, 3 positive; ranking 1 0 2 3
    pos = np.array([True, False, False, True])
    junk = np.array([False, True, False, False])
    order = np.array([1, 0, 2, 3])
    ranks = positive_ranks(order, pos, junk)
    assert ranks.tolist() == [0, 2]  # as if the ranking were 0 2 3
    truth = [
        QueryTruth(np.array([0, 3]), np.array([1])),
        QueryTruth(np.array([2]), np.array([], dtype=np.int64)),
        QueryTruth(np.array([], dtype=np.int64)),  # no positive: left out of the mean
    ]
    orders = np.array([[1, 0, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]])
    res = score_rankings(orders, truth, 4, ks=(1, 2))
    ap0, ap1 = 0.5 + (0.5 + 2 / 3) / 4, (0 / 2 + 1 / 3) / 2  # query 1: one positive, 3rd
    assert res["ap"][0] == pytest.approx(ap0) and res["ap"][1] == pytest.approx(ap1)
    assert res["ap"][2] is None and res["scored_queries"] == 2
    assert res["mAP"] == pytest.approx((ap0 + ap1) / 2)
    assert res["precision@k"] == {"1": pytest.approx(0.5), "2": pytest.approx(0.25)}


def test_precision_at_k_by_hand():
    ranks = np.array([0, 2])  # relevant at 1st and 3rd place
    assert [precision_at_k(ranks, k) for k in (1, 2, 3, 5)] == pytest.approx([1, 0.5, 2 / 3, 0.4])
    # revisitop's mP@k stops at the last positive: at k=5 it is precision at 3
    assert [revisitop_precision_at_k(ranks, k) for k in (1, 2, 5)] == pytest.approx([1, 0.5, 2 / 3])


def test_the_three_protocols_split_easy_and_hard():
    # easy images 0 and 1, hard image 2, junk 3; ranking 2 3 0 4 1
    g = {"easy": [0, 1], "hard": [2], "junk": [3]}
    order = np.array([[2, 3, 0, 4, 1]])
    aps = {}
    for protocol, (pos_keys, junk_keys) in PROTOCOLS.items():
        pos = np.concatenate([g[k] for k in pos_keys])
        junk = np.concatenate([g[k] for k in ("junk", *junk_keys)])
        aps[protocol] = score_rankings(order, [QueryTruth(pos, junk)], 5)["mAP"]
    # easy: 2 and 3 are junk, ranking 0 4 1 -> ranks 0, 2
    assert aps["easy"] == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # medium: 3 junk, ranking 2 0 4 1 -> ranks 0, 1, 3 of 3
    assert aps["medium"] == pytest.approx((1 + (1 + 1) / 2 + (2 / 3 + 3 / 4) / 2) / 3)
    # hard: 3, 0, 1 junk, ranking 2 4 -> rank 0
    assert aps["hard"] == 1.0


def test_ranking_in_blocks_equals_ranking_at_once():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=1)
    db = torch.nn.functional.normalize(torch.randn(11, 5, generator=g), dim=1)
    exclude = [None, 3, None, None, 0, None, 10]
    whole = list(rank_chunks(q, db, exclude))
    blocks = list(rank_chunks(q, db, exclude, chunk_elems=22))  # 2 queries at a time
    assert len(whole) == 1 and len(blocks) == 4
    assert (np.concatenate([o for _, o, _ in blocks]) == whole[0][1]).all()
    order = whole[0][1]
    assert order[1, -1] == 3 and order[6, -1] == 10  # the excluded image comes last
    assert (order[0] == np.argsort(-(q[0] @ db.T).numpy())).all()


def test_multiscale_feeds_three_scales_and_averages():
    seen = []

    class Probe(torch.nn.Module):
        patch_embed = type("P", (), {"patch_size": (8, 8)})()

        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return torch.ones(x.shape[0], 4) * x.shape[-1]

    x = torch.randn(1, 3, 100, 130)
    out = global_feature(Probe(), x, SCALES)
    # 1, 1/sqrt(2), 1/2 of (100, 130), cropped to whole 8-px patches
    assert seen == [(96, 128), (64, 88), (48, 64)]
    assert torch.allclose(out, torch.full((1, 4), 0.5))  # the mean, L2-normalized


# ------------------------------------------------------------------ on photos


def test_revisitop_layout_with_a_random_vit(tmp_path):
    root = revisitop_folder(tmp_path)
    res = image_retrieval(pico, data=root, imsize=96, device="cpu")
    assert res["dataset"] == "roxford5k" and res["n_queries"] == len(PHOTOS)
    assert set(res["mAP"]) == {"easy", "medium", "hard"}
    # 3 relevant among 26 images: a random ranking scores about 0.15; near-duplicates rank first
    assert res["mAP"]["medium"] > 0.6, res["mAP"]
    assert res["mAP"]["easy"] > 0.6
    assert set(res["mP@k"]["hard"]) == {"1", "5", "10"}
    cropped = image_retrieval(pico, data=root, imsize=96, crop_queries=True, device="cpu")
    assert cropped["crop_queries"] and cropped["mAP"]["medium"] != res["mAP"]["medium"]


def test_plain_folders_with_classes(tmp_path, capsys):
    q, db = class_folders(tmp_path)
    out, js = tmp_path / "nn.csv", tmp_path / "r.json"
    code, stdout, err = run_cli(
        [
            "retrieval",
            *RANDOM_PICO,
            "--queries",
            str(q),
            "--database",
            str(db),
            "--imsize",
            "96",
            "--topk",
            "4",
            "--neighbours",
            str(out),
            "--json",
            str(js),
            "--multiscale",
            "--device",
            "cpu",
            "--num-workers",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    assert "mAP" in stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 * len(PHOTOS)
    assert set(rows[0]) == {"query", "rank", "neighbour", "similarity"}
    first = {r["query"]: r["neighbour"] for r in rows if r["rank"] == "1"}
    hits = sum(n.split("/")[0] == qn.split("/")[0] for qn, n in first.items())
    assert hits >= len(PHOTOS) - 1  # each photo finds one of its own copies first
    res = json.loads(js.read_text())
    assert res["multiscale"] is True and res["mAP"] > 0.6
    assert set(res["precision@k"]) == {"1", "5", "10"}


def test_an_image_is_never_its_own_neighbour(tmp_path):
    _q, db = class_folders(tmp_path)
    res = image_retrieval(
        pico, queries=db, database=db, imsize=96, neighbours_csv=tmp_path / "nn.csv", topk=3
    )
    rows = list(csv.DictReader((tmp_path / "nn.csv").open()))
    assert rows and all(r["query"] != r["neighbour"] for r in rows)
    # every image has others of its class (the distractors' class too), itself excluded
    assert res["scored_queries"] == 3 * len(PHOTOS) + len(GREYS)
    assert 0 <= res["mAP"] <= 1


# ------------------------------------------------------------------ bad input


def test_empty_query_folder(tmp_path, capsys):
    _q, db = class_folders(tmp_path)
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        ["retrieval", *RANDOM_PICO, "--queries", str(tmp_path / "empty"), "--database", str(db)],
        capsys,
    )
    assert code == 2 and "holds no image" in one_error_line(err)


def test_ground_truth_that_does_not_match_the_images(tmp_path, capsys):
    root = revisitop_folder(tmp_path)
    gnd_file = root / "roxford5k" / "gnd_roxford5k.pkl"
    cfg = pickle.loads(gnd_file.read_bytes())
    cases = {
        "missing": dict(cfg, imlist=[*cfg["imlist"], "not_there"]),
        "index": dict(cfg, gnd=[dict(cfg["gnd"][0], easy=[999]), *cfg["gnd"][1:]]),
        "count": dict(cfg, gnd=cfg["gnd"][:-1]),
    }
    expect = {"missing": "not_there.jpg", "index": "image index 999", "count": "entries for"}
    for case, bad in cases.items():
        gnd_file.write_bytes(pickle.dumps(bad))
        code, _, err = run_cli(["retrieval", *RANDOM_PICO, "--data", str(root)], capsys)
        line = one_error_line(err)
        assert code == 2 and "does not match" in line and expect[case] in line, line
    gnd_file.write_bytes(b"not a pickle")
    with pytest.raises(DinoError, match="cannot read"):
        image_retrieval(pico, data=root)


def test_results_are_never_overwritten(tmp_path, capsys):
    q, db = class_folders(tmp_path)
    out = tmp_path / "nn.csv"
    out.write_text("earlier")
    code, _, err = run_cli(
        [
            "retrieval",
            *RANDOM_PICO,
            "--queries",
            str(q),
            "--database",
            str(db),
            "--neighbours",
            str(out),
        ],
        capsys,
    )
    assert code == 2 and "already exists" in one_error_line(err)
    assert out.read_text() == "earlier"
    code, _, err = run_cli(
        [
            "retrieval",
            *RANDOM_PICO,
            "--data",
            str(tmp_path),
            "--queries",
            str(q),
            "--database",
            str(db),
        ],
        capsys,
    )
    assert code == 2 and "not both" in one_error_line(err)
