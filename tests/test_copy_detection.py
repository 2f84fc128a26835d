"""Copy detection (``dino copy-detection``): GeM, whitening and Copydays scoring by hand, and
copies of scikit-image photos (JPEG re-encoding, crops, colour changes) among distractors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.commands import RANDOM_PICO, one_error_line, pico, run_cli
from helpers.photos import GREYS, PHOTOS, crop, jpeg, photo
from PIL import Image, ImageEnhance

from dino.eval.copy_detection import (
    Whitening,
    copy_detection,
    copydays_subsets,
    gem,
    read_copydays,
    score_block,
)

pytest.importorskip("skimage.data")


def strong(im: Image.Image) -> Image.Image:
    """A 'strong' attack: crop, colour change, then heavy JPEG."""
    im = ImageEnhance.Color(ImageEnhance.Brightness(crop(im, 0.8)).enhance(1.3)).enhance(0.4)
    return jpeg(im, 30)


def copydays(root: Path) -> Path:
    """Copydays' layout: original/2<id>00.jpg, strong/2<id>01.jpg, jpegqual/10/, crops/50/
    (names as the originals), and a folder of grey distractors."""
    for block in ("original", "strong", "jpegqual/10", "crops/50"):
        (root / block).mkdir(parents=True)
    for i, name in enumerate(PHOTOS):
        im = photo(name)
        im.save(root / "original" / f"2{i:03d}00.jpg", quality=95)
        strong(im).save(root / "strong" / f"2{i:03d}01.jpg", quality=95)
        jpeg(im, 10).save(root / "jpegqual/10" / f"2{i:03d}00.jpg", quality=95)
        crop(im, 0.7).save(root / "crops/50" / f"2{i:03d}00.jpg", quality=95)
    (root / "distractors").mkdir()
    for name in GREYS:
        photo(name).save(root / "distractors" / f"{name}.jpg")
    return root


# ------------------------------------------------------------------ by hand


def test_gem_by_hand():
    tokens = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])  # one image, 2 tokens, 2 dims
    out = gem(tokens)
    assert out[0, 0] == pytest.approx(((1 + 81) / 2) ** 0.25)
    # negative values are clamped at 1e-6 before the power
    assert out[0, 1] == pytest.approx((((1e-6) ** 4 + 0.5**4) / 2) ** 0.25)
    assert torch.allclose(gem(tokens.abs(), p=1), tokens.abs().mean(1))


def test_whitening_makes_the_second_moment_identity():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g)
    x = torch.randn(4000, 6, generator=g) @ mix  # correlated, zero mean
    w = Whitening.learn(x)
    white = (x - w.mean) @ w.projection.T
    moment = white.T @ white / len(x)
    assert torch.allclose(moment, torch.eye(6), atol=0.05)
    # fewer images than dimensions: only the directions they span are kept
    few = Whitening.learn(x[:4])
    assert few.projection.shape == (4, 6)


def test_score_block_counts_the_first_20_results_only():
    orders = np.array([[5, 0, *range(6, 24)], [*range(1, 21)]])
    # query 0: its original (0) second -> AP (0 + 1/2) / 2; query 1: original 0 not in top 20
    assert score_block(orders, [[0], [0]], 20) == pytest.approx((0.25 + 0.0) / 2)
    assert score_block(np.array([[0, 3, 1]]), [[0, 1]], 3) == pytest.approx(
        (1 + 1) / 2 / 2 + (1 / 2 + 2 / 3) / 2 / 2
    )


def test_subsets_average_their_blocks():
    blocks = {
        "original": 1.0,
        "strong": 0.5,
        "jpegqual/3": 0.6,
        "jpegqual/75": 1.0,
        "crops/10": 0.2,
    }
    assert copydays_subsets(blocks) == pytest.approx(
        {"original": 1.0, "strong": 0.5, "jpeg": 0.8, "crops": 0.2}
    )


def test_copydays_ground_truth(tmp_path):
    originals, blocks = read_copydays(copydays(tmp_path))
    assert [b.name for b in blocks] == ["original", "strong", "jpegqual/10", "crops/50"]
    strong_block = blocks[1]
    assert strong_block.positives == [[i] for i in range(len(PHOTOS))]
    assert len(originals) == len(PHOTOS)


# ------------------------------------------------------------------ on photos


def test_copydays_with_a_random_vit(tmp_path, capsys):
    root = copydays(tmp_path / "copydays")
    js = tmp_path / "r.json"
    code, stdout, err = run_cli(
        [
            "copy-detection",
            *RANDOM_PICO,
            "--data",
            str(root),
            "--distractors",
            str(root / "distractors"),
            "--imsize",
            "96",
            "--json",
            str(js),
            "--device",
            "cpu",
            "--num-workers",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    res = json.loads(js.read_text())
    assert set(res["mAP"]) == {"original", "strong", "jpeg", "crops"}
    # no --whitening: nothing is learned, not even on the distractors of the database
    assert res["n_distractors"] == len(GREYS) and res["whitening_images"] == 0
    assert (res["whitening"], res["whitening_learned_on"], res["whitening_dims"]) == (
        "none",
        None,
        None,
    )
    # 14 database images: a random ranking scores about 0.25; JPEG copies are found first
    assert res["mAP"]["original"] == 1.0
    assert res["mAP"]["jpeg"] >= 0.9 and res["mAP"]["crops"] >= 0.5, res["mAP"]
    assert "strong mAP" in stdout


def test_plain_folders_list_each_copys_best_match(tmp_path):
    originals, copies = tmp_path / "originals", tmp_path / "copies"
    originals.mkdir()
    copies.mkdir()
    for name in PHOTOS:
        im = photo(name)
        im.save(originals / f"{name}.png")
        jpeg(im, 20).save(copies / f"{name}_jpeg.jpg")
        crop(im, 0.75).save(copies / f"{name}_crop.png")
    others = tmp_path / "whitening"
    others.mkdir()
    for name in GREYS:
        photo(name).save(others / f"{name}.png")
    out = tmp_path / "matches.csv"
    res = copy_detection(
        pico,
        originals=originals,
        copies=copies,
        whitening=others,
        imsize=96,
        matches_csv=out,
        device="cpu",
    )
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * len(PHOTOS) == res["n_copies"]
    # the whitening is learned on the given folder only, and the results say so
    assert res["whitening"] == "PCA whitening (power 0.5)"
    assert (res["whitening_learned_on"], res["whitening_images"]) == (str(others), len(GREYS))
    right = sum(Path(r["best_match"]).stem == Path(r["query"]).stem.rsplit("_", 1)[0] for r in rows)
    assert right >= 2 * len(PHOTOS) - 1
    assert all(-1 <= float(r["similarity"]) <= 1 for r in rows)


# ------------------------------------------------------------------ bad input


def test_empty_copies_folder(tmp_path, capsys):
    root = copydays(tmp_path / "c")
    (tmp_path / "none").mkdir()
    code, _, err = run_cli(
        [
            "copy-detection",
            *RANDOM_PICO,
            "--originals",
            str(root / "original"),
            "--copies",
            str(tmp_path / "none"),
        ],
        capsys,
    )
    assert code == 2 and "holds no image" in one_error_line(err)


def test_blocks_that_do_not_match_the_originals(tmp_path, capsys):
    root = copydays(tmp_path / "c")
    (root / "jpegqual/10" / "200000.jpg").unlink()
    code, _, err = run_cli(["copy-detection", *RANDOM_PICO, "--data", str(root)], capsys)
    assert code == 2 and "one copy of each original" in one_error_line(err)
    (root / "jpegqual/10").rename(tmp_path / "aside")
    Image.new("RGB", (50, 50)).save(root / "strong" / "999901.jpg")
    code, _, err = run_cli(["copy-detection", *RANDOM_PICO, "--data", str(root)], capsys)
    assert code == 2 and "matches no original" in one_error_line(err)


def test_contradictions_and_existing_results(tmp_path, capsys):
    root = copydays(tmp_path / "c")
    code, _, err = run_cli(
        [
            "copy-detection",
            *RANDOM_PICO,
            "--data",
            str(root),
            "--whitening",
            str(root),
            "--no-whitening",
        ],
        capsys,
    )
    assert code == 2 and "contradict" in one_error_line(err)
    out = tmp_path / "m.csv"
    out.write_text("earlier")
    code, _, err = run_cli(
        ["copy-detection", *RANDOM_PICO, "--data", str(root), "--matches", str(out)], capsys
    )
    assert code == 2 and "already exists" in one_error_line(err)
    assert out.read_text() == "earlier"
    code, _, err = run_cli(
        [
            "copy-detection",
            "--weights",
            "random",
            "--arch",
            "tv:resnet18",
            "--data",
            str(root),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2 and "not one" in one_error_line(err)
