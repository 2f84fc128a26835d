"""``dino classify``: the weighted k-NN vote of a labeled bank for new images, its cached bank
features, and the inputs it refuses (one ``dino: error:`` line, nothing written)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from helpers.commands import RANDOM_PICO, one_error_line, run_cli
from helpers.two_classes import write_folder
from PIL import Image

VIEW = ["--eval-resize", "16", "--eval-crop", "16", "--num-workers", "0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("stripes"), train=10, val=6)


def classify(folder: Path, out: Path, *extra: str) -> list[str]:
    return [*RANDOM_PICO, "--bank", str(folder / "train"), "--images", str(folder / "val"),
            "--output", str(out), *VIEW, *extra]  # fmt: skip


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_classify_labels_new_images_by_the_weighted_vote(folder, tmp_path, capsys) -> None:
    out = tmp_path / "pred.csv"
    sheet = tmp_path / "sheet.png"
    code, stdout, _ = run_cli(["classify", *classify(folder, out, "--k", "5", "--json",
                                                     "--sheet", str(sheet))], capsys)  # fmt: skip
    assert code == 0
    summary = json.loads(stdout)
    rows = read_rows(out)
    assert list(rows[0])[:3] == ["file", "label", "score"] and len(rows) == 12
    assert summary["images"] == 12 and summary["bank_images"] == 20
    for row in rows:
        # the score is the predicted class's share of the votes exp(sim / T) of the 5 neighbours
        names = [row[f"neighbour{i}"] for i in range(1, 6)]
        sims = [float(row[f"similarity{i}"]) for i in range(1, 6)]
        assert sims == sorted(sims, reverse=True)
        votes: dict[str, float] = {}
        for name, sim in zip(names, sims, strict=True):
            kind = Path(name).parent.name
            votes[kind] = votes.get(kind, 0.0) + math.exp(sim / 0.07)
        assert row["label"] == max(votes, key=votes.__getitem__)
        assert float(row["score"]) == pytest.approx(votes[row["label"]] / sum(votes.values()),
                                                    abs=1e-4)  # fmt: skip
    # the accuracy reported for class subfolders is the share of rows whose folder is the label
    right = sum(Path(r["file"]).parent.name == r["label"] for r in rows)
    assert summary["accuracy"] == pytest.approx(100 * right / 12)
    assert Image.open(sheet).size[0] > 96 * 6


def test_classify_separates_clearly_different_classes(tmp_path, capsys) -> None:
    """Dark noise against bright noise: the random network's nearest neighbours are of the right
    class, so every new image gets its folder's label."""
    rng = np.random.default_rng(0)
    for split, n in (("bank", 8), ("new", 5)):
        for kind, low in (("dark", 0), ("bright", 180)):
            (tmp_path / split / kind).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(low, low + 70, (16, 16)).astype(np.uint8)
                Image.fromarray(a).save(tmp_path / split / kind / f"{i}.png")
    out = tmp_path / "pred.csv"
    argv = [*RANDOM_PICO, "--bank", str(tmp_path / "bank"), "--images", str(tmp_path / "new"),
            "--output", str(out), *VIEW, "--k", "3"]  # fmt: skip
    assert run_cli(["classify", *argv], capsys)[0] == 0
    rows = read_rows(out)
    assert len(rows) == 10
    assert all(Path(r["file"]).parent.name == r["label"] for r in rows)


def test_bank_features_are_reused_until_the_bank_changes(folder, tmp_path, capsys) -> None:
    bank = tmp_path / "bank"
    for kind in ("horizontal", "vertical"):
        (bank / kind).mkdir(parents=True)
        for p in sorted((folder / "train" / kind).iterdir()):
            (bank / kind / p.name).write_bytes(p.read_bytes())
    argv = [*RANDOM_PICO, "--bank", str(bank), "--images", str(folder / "val"), *VIEW, "--json",
            "--k", "20", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip

    def call(name: str) -> dict:
        code, stdout, _ = run_cli(["classify", *argv, "--output", str(tmp_path / name)], capsys)
        assert code == 0
        return json.loads(stdout)

    first, second = call("a.csv"), call("b.csv")
    assert not first["bank_reused"] and second["bank_reused"]
    assert read_rows(tmp_path / "a.csv") == read_rows(tmp_path / "b.csv")
    # one bank image replaced by another picture: the cache no longer matches
    target = bank / "horizontal" / "000.png"
    Image.open(bank / "vertical" / "000.png").save(target)
    os.utime(target, ns=(1, 1))
    third = call("c.csv")
    assert not third["bank_reused"] and third["bank_cache"] != second["bank_cache"]
    # k = the whole bank: every row lists the changed image, now at another similarity
    for old, new in zip(read_rows(tmp_path / "a.csv"), read_rows(tmp_path / "c.csv"), strict=True):
        where = [i for i in range(1, 21) if new[f"neighbour{i}"] == str(target)]
        was = [i for i in range(1, 21) if old[f"neighbour{i}"] == str(target)]
        assert old[f"similarity{was[0]}"] != new[f"similarity{where[0]}"]


def test_classify_refuses_bad_input_and_writes_nothing(folder, tmp_path, capsys) -> None:
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    Image.new("L", (16, 16)).save(one / "a.png")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    out = tmp_path / "out" / "pred.csv"
    base = [*RANDOM_PICO, "--output", str(out), *VIEW]
    cases = {
        "1 class": ["--bank", str(one.parent), "--images", str(folder / "val")],
        "no image files": ["--bank", str(folder / "train"), "--images", str(empty)],
        "--bank is needed": ["--images", str(folder / "val")],
        "more neighbours": [
            "--bank",
            str(folder / "train"),
            "--images",
            str(folder / "val"),
            "--k",
            "500",
        ],  # fmt: skip
    }
    for expected, argv in cases.items():
        code, _, err = run_cli(["classify", *base, *argv], capsys)
        assert code == 2 and expected in one_error_line(err), err
        assert not (tmp_path / "out").exists()
    out.parent.mkdir()
    out.write_text("earlier results\n")
    code, _, err = run_cli(["classify", *classify(folder, out)], capsys)
    assert code == 2 and "already exists" in one_error_line(err)
    assert out.read_text() == "earlier results\n"
