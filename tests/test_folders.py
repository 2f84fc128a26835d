"""Folders of images: ``dino extract --patch-tokens``, ``dino cluster``, ``dino duplicates``.

The backbone is the untrained ViT-pico of RANDOM_PICO; the folders hold two classes that differ
in colour (even random features separate them) or distinct noise images with planted copies.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers.commands import RANDOM_PICO, one_error_line, pico, run_cli
from PIL import Image

from dino.eval.clusters import nmi, purity
from dino.eval.duplicates import duplicate_groups, similar_pairs
from dino.eval.patch_features import cls_and_patch_tokens
from dino.eval.views import eval_transform, resolve_view

VIEW = ["--eval-resize", "32", "--eval-crop", "32", "--num-workers", "0", "--batch-size", "4"]


def two_colours(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c, (name, base) in enumerate((("red", (200, 40, 40)), ("blue", (40, 60, 220)))):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pix = np.clip(np.array(base) + rng.normal(0, 30, (32, 32, 3)), 0, 255)
            Image.fromarray(pix.astype(np.uint8)).save(root / name / f"{c}{i}.png")
    return root


def noise_with_copies(root: Path) -> Path:
    """Six distinct noise images (smooth blobs) and two copies: an exact one of a, and one of c
    with a slight colour shift."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    for name in "abcdef":
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.Resampling.BICUBIC).save(root / f"{name}.png")
    Image.open(root / "a.png").save(root / "a_copy.png")
    shifted = np.asarray(Image.open(root / "c.png"), dtype=np.float32) * [1.02, 1.0, 0.98]
    Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8)).save(root / "c_tint.png")
    return root


def test_extract_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    """The memory-mapped feature files take their disk space before the first row is written:
    no space is one error line (a write through a map to a full disk would be a SIGBUS)."""
    import errno
    import os

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "feats"
    args = ["extract", *RANDOM_PICO, "--data", str(two_colours(tmp_path / "imgs", 3))]
    code, _, err = run_cli([*args, "--output", str(out), "--patch-tokens", *VIEW], capsys)
    line = one_error_line(err)
    assert code == 2 and "features.npy" in line and "no space left" in line.lower()
    assert not (out / "features.npy").exists()


def test_extract_patch_tokens_stream_to_npy(tmp_path, capsys) -> None:
    src = two_colours(tmp_path / "imgs", 3)
    (src / "red" / "zz-broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "feats"
    code, text, err = run_cli(
        [
            "extract",
            *RANDOM_PICO,
            "--data",
            str(src),
            "--output",
            str(out),
            "--patch-tokens",
            *VIEW,
        ],  # fmt: skip
        capsys,
    )
    assert code == 0, err
    assert "patch tokens 6x4x4x96" in text
    feats = np.load(out / "features.npy", mmap_mode="r")
    patches = np.load(out / "patch_tokens.npy", mmap_mode="r")
    assert feats.shape == (6, 96) and patches.shape == (6, 4, 4, 96)  # broken file dropped
    assert patches.dtype == np.float16
    rows = list(csv.DictReader(open(out / "index.csv")))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["patch_tokens"]["shape"] == [6, 4, 4, 96]
    assert [r["class"] for r in rows] == ["blue"] * 3 + ["red"] * 3
    model = pico()
    view = resolve_view(str(src), None, 32, 32)
    x = eval_transform(view)(Image.open(rows[4]["path"]).convert("RGB"))[None]
    cls, grid = cls_and_patch_tokens(model, x)
    assert np.abs(feats[4] - cls[0].numpy()).max() < 1e-4
    assert np.abs(feats[4] - model(x)[0].detach().numpy()).max() < 1e-4
    tol = 2e-3 * float(grid.abs().max())  # float16
    assert np.abs(patches[4].astype(np.float32) - grid[0].numpy()).max() < tol


def test_cluster_two_colours(tmp_path, capsys) -> None:
    pytest.importorskip("faiss")
    src = two_colours(tmp_path / "imgs")
    out = tmp_path / "clusters"
    code, text, err = run_cli(
        ["cluster", *RANDOM_PICO, "--data", str(src), "--k", "2", "--output", str(out), *VIEW],
        capsys,
    )
    assert code == 0, err
    rows = list(csv.reader(open(out / "clusters.csv")))
    assert rows[0][:2] == ["file", "cluster"] and len(rows) == 9
    by_colour = {}
    for file, c, dist in rows[1:]:
        by_colour.setdefault(Path(file).parent.name, set()).add(c)
        assert 0 <= float(dist) <= 2
    assert by_colour["red"].isdisjoint(by_colour["blue"])  # one cluster per colour
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert scores["purity"] == 1.0 and scores["nmi"] == pytest.approx(1.0)
    assert sorted(p.name for p in out.glob("cluster-*.png")) == ["cluster-0.png", "cluster-1.png"]


def test_purity_and_nmi_by_definition() -> None:
    labels = np.array([0, 0, 1, 1])
    assert purity(labels, np.array([5, 5, 7, 7])) == 1.0
    assert nmi(labels, np.array([5, 5, 7, 7])) == pytest.approx(1.0)
    assert nmi(labels, np.array([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)  # independent
    clusters = np.array([0, 0, 0, 1])
    assert purity(labels, clusters) == 0.75
    # p(c, y): (0, 0) 1/2, (0, 1) 1/4, (1, 1) 1/4; p(c) = 3/4, 1/4; p(y) = 1/2, 1/2
    mi = 0.5 * np.log(0.5 / (0.75 * 0.5)) + 0.25 * np.log(0.25 / (0.75 * 0.5))
    mi += 0.25 * np.log(0.25 / (0.25 * 0.5))
    hc = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert nmi(labels, clusters) == pytest.approx(2 * mi / (np.log(2) + hc))


def test_blocked_pairs_equal_the_full_matrix(rng) -> None:
    x = rng.standard_normal((50, 8)).astype(np.float32)
    x[10] = x[3] + 0.01  # planted pairs, one of them across blocks
    x[41] = x[3] - 0.01
    x[20] = x[21] * 1.5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full = x @ x.T
    want = {(i, j) for i in range(50) for j in range(i + 1, 50) if full[i, j] >= 0.9}
    got = set()
    for i, j, s in similar_pairs(x, 0.9, block=7):
        got |= set(zip(i.tolist(), j.tolist(), strict=True))
        assert np.allclose(s, full[i, j], atol=1e-5)
    assert got == want and {(3, 10), (3, 41), (20, 21)} <= got
    groups = [g.tolist() for g in duplicate_groups(x, 0.9, block=7)]
    assert [3, 10, 41] in groups and [20, 21] in groups


def test_duplicates_finds_the_copies(tmp_path, capsys) -> None:
    src = noise_with_copies(tmp_path / "imgs")
    out = tmp_path / "dups"
    code, text, err = run_cli(
        [
            "duplicates",
            *RANDOM_PICO,
            "--data",
            str(src),
            "--output",
            str(out),
            "--threshold",
            "0.995",
            *VIEW,
        ],  # fmt: skip
        capsys,
    )
    assert code == 0, err
    rows = list(csv.reader(open(out / "duplicates.csv")))
    assert rows[0][:2] == ["group", "file"]
    groups: dict[str, list[str]] = {}
    for g, file, sim in rows[1:]:
        groups.setdefault(g, []).append(Path(file).name)
        assert 0.995 <= float(sim) <= 1 + 1e-5  # to the group's first file
    assert sorted(groups.values()) == [["a.png", "a_copy.png"], ["c.png", "c_tint.png"]]
    assert (out / "duplicates.png").is_file()
    assert json.loads((out / "summary.json").read_text())["groups"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cluster", "--k", "9"], "--k 9 is more clusters than the 8 images"),
        (["duplicates", "--threshold", "0"], "--threshold"),
        (["duplicates", "--threshold", "1.5"], "--threshold"),
        (["cluster", "--k", "0"], "--k"),
    ],
)
def test_bad_input_one_line_nothing_written(tmp_path, capsys, argv, message) -> None:
    src = two_colours(tmp_path / "imgs")
    out = tmp_path / "out"
    code, _, err = run_cli([*argv, *RANDOM_PICO, "--data", str(src), "--output", str(out)], capsys)
    assert code == 2 and message in one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("command", [["cluster", "--k", "2"], ["duplicates"]])
def test_empty_folder_is_refused(tmp_path, capsys, command) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    argv = [*command, *RANDOM_PICO, "--data", str(tmp_path / "empty"), "--output", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "no image files" in one_error_line(err)
    assert not out.exists()


def test_earlier_results_are_not_overwritten(tmp_path, capsys) -> None:
    src = two_colours(tmp_path / "imgs")
    out = tmp_path / "dups"
    out.mkdir()
    (out / "duplicates.csv").write_text("group,file,similarity\n0,x,1\n")
    argv = ["duplicates", *RANDOM_PICO, "--data", str(src), "--output", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "already exists" in one_error_line(err)
    assert (out / "duplicates.csv").read_text() == "group,file,similarity\n0,x,1\n"
