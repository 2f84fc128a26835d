"""Video object segmentation by label propagation (``dino track``) and the DAVIS J and F scores.

The videos are made here: coloured shapes moving over a textured background, with exact masks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.commands import RANDOM_PICO, one_error_line, run_cli
from PIL import Image

from dino.errors import DinoError
from dino.eval.davis_io import Video, davis_palette, read_mask, write_indexed_png
from dino.eval.davis_scores import boundary_f, boundary_map, jaccard, summarize
from dino.eval.label_propagation import (
    LabelPropagation,
    TrackSettings,
    labels_to_ids,
    propagate,
    working_size,
)
from dino.eval.video_segmentation import track_video, video_segmentation
from dino.imagenet import IMAGENET_MEAN, IMAGENET_STD

RED, BLUE = (220, 30, 30), (30, 60, 230)


def shapes_video(n: int = 12, h: int = 64, w: int = 128, step: int = 3, aligned: bool = False):
    """Frames (uint8 [h, w, 3]) and masks (ids) of a red square moving right and a blue disk
    moving left and down over a static textured background. ``aligned``: full-width red and blue
    bands 16 px high on the 8-px patch grid, moving 8 px a frame towards each other over a
    plain background: masks without corners, which patch labels upsampled bilinearly (the
    protocol) render exactly."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    coarse = rng.uniform(70, 150, size=(h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
    bg = np.asarray(Image.fromarray(coarse).resize((w + 32, h + 32), Image.Resampling.BICUBIC))
    bg = bg[:h, :w].astype(np.float64) + rng.normal(0, 6, size=(h, w, 3))
    if aligned:
        bg = np.full((h, w, 3), 110.0)
    frames, masks = [], []
    for t in range(n):
        img, ids = bg.copy(), np.zeros((h, w), np.uint8)
        if aligned:
            one = (yy >= 8 * t) & (yy < 8 * t + 16)
            two = (yy >= h - 16 - 8 * t) & (yy < h - 8 * t)
        else:
            x0 = 8 + step * t
            one = (xx >= x0) & (xx < x0 + 18) & (yy >= 12) & (yy < 30)
            two = (xx - (100 - step * t)) ** 2 + (yy - (30 + t)) ** 2 <= 81
        img[one], ids[one] = RED, 1
        img[two], ids[two] = BLUE, 2
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(ids)
    return frames, masks


def write_davis(root: Path, videos: dict[str, tuple[list, list]], listed: list[str] | None):
    """A DAVIS root: JPEG frames, indexed-PNG annotations for every frame, and val.txt."""
    pal = davis_palette()
    for name, (frames, masks) in videos.items():
        (root / "JPEGImages/480p" / name).mkdir(parents=True)
        (root / "Annotations/480p" / name).mkdir(parents=True)
        for t, (f, m) in enumerate(zip(frames, masks, strict=True)):
            Image.fromarray(f).save(root / f"JPEGImages/480p/{name}/{t:05d}.jpg", quality=95)
            write_indexed_png(root / f"Annotations/480p/{name}/{t:05d}.png", m, pal)
    if listed is not None:
        (root / "ImageSets/2017").mkdir(parents=True)
        (root / "ImageSets/2017/val.txt").write_text("".join(f"{v}\n" for v in listed))
    return root


def copy_first_mask_scores(masks: list[np.ndarray]) -> float:
    """J&F of the baseline that repeats the first mask, on the frames DAVIS scores."""
    js, fs = {1: [], 2: []}, {1: [], 2: []}
    for t in range(1, len(masks) - 1):
        for o in (1, 2):
            js[o].append(jaccard(masks[t] == o, masks[0] == o))
            fs[o].append(boundary_f(masks[t] == o, masks[0] == o))
    j = np.mean([np.mean(v) for v in js.values()])
    f = np.mean([np.mean(v) for v in fs.values()])
    return float((j + f) / 2)


def track_args(root: Path, out: Path) -> list[str]:
    return ["track", *RANDOM_PICO, "--data", str(root), "--output", str(out)]


# ------------------------------------------------------------------ scores by hand


def test_palette_is_the_davis_one():
    pal = davis_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert pal[8].tolist() == [64, 0, 0]
    assert pal[255].tolist() == [224, 224, 192]


def test_jaccard_on_small_masks():
    gt = np.zeros((4, 4), bool)
    gt[1:3, 1:3] = True  # 4 pixels
    pred = np.zeros((4, 4), bool)
    pred[1:3, 2:4] = True  # 4 pixels, 2 shared
    assert jaccard(gt, pred) == pytest.approx(2 / 6)
    assert jaccard(gt, gt) == 1.0
    empty = np.zeros((4, 4), bool)
    assert jaccard(empty, empty) == 1.0  # nothing to find, nothing found
    assert jaccard(gt, empty) == 0.0
    assert jaccard(empty, gt) == 0.0


def test_boundary_map_of_one_pixel_and_of_full_masks():
    m = np.zeros((5, 5), bool)
    m[2, 2] = True
    # the boundary sits half a pixel towards the origin: a 2x2 block ending at the pixel
    assert np.argwhere(boundary_map(m)).tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert not boundary_map(np.ones((5, 5), bool)).any()  # the image border is no boundary
    assert not boundary_map(np.zeros((5, 5), bool)).any()
    right = np.zeros((4, 4), bool)
    right[:, 2:] = True  # a vertical edge between columns 1 and 2
    assert np.argwhere(boundary_map(right)).tolist() == [[0, 1], [1, 1], [2, 1], [3, 1]]


def test_boundary_f_on_small_masks():
    # 10x10: the tolerance is ceil(0.008 * 14.1) = 1 px, a cross-shaped disk
    gt = np.zeros((10, 10), bool)
    gt[4, 4] = True  # boundary {(3,3), (3,4), (4,3), (4,4)}
    pred = np.zeros((10, 10), bool)
    pred[4, 6] = True  # boundary {(3,5), (3,6), (4,5), (4,6)}
    # (3,5) and (4,5) lie 1 px from (3,4) and (4,4), the rest 2 px or more: P = R = 1/2
    assert boundary_f(gt, pred) == pytest.approx(0.5)
    far = np.zeros((10, 10), bool)
    far[8, 8] = True
    assert boundary_f(gt, far) == 0.0
    assert boundary_f(gt, gt) == 1.0
    empty = np.zeros((10, 10), bool)
    assert boundary_f(empty, empty) == 1.0
    assert boundary_f(gt, empty) == 0.0  # precision 1, recall 0
    assert boundary_f(empty, gt) == 0.0  # precision 0, recall 1


def test_boundary_f_tolerance_is_a_disk_of_0008_of_the_diagonal():
    h, w = 200, 300  # ceil(0.008 * 360.6) = 3 px
    assert math.ceil(0.008 * math.hypot(h, w)) == 3
    gt = np.zeros((h, w), bool)
    gt[50:150, 100:200] = True
    for shift, expect_one in ((3, True), (4, False)):
        pred = np.roll(gt, shift, axis=1)
        f = boundary_f(gt, pred)
        assert bool(f == 1.0) is expect_one, (shift, f)
    # a diagonal shift of (2, 2) is 2.83 px away: within the disk; (3, 3) is 4.24: outside
    assert boundary_f(gt, np.roll(gt, (2, 2), axis=(0, 1))) == 1.0
    assert boundary_f(gt, np.roll(gt, (3, 3), axis=(0, 1))) < 1.0


def test_boundary_f_matches_an_independent_dilation():
    ndimage = pytest.importorskip("scipy.ndimage")
    morphology = pytest.importorskip("skimage.morphology")
    rng = np.random.default_rng(3)
    for _ in range(4):
        noise = ndimage.gaussian_filter(rng.normal(size=(90, 130)), 6)
        gt, pred = noise > 0.01, np.roll(noise, (2, 5), axis=(0, 1)) > -0.01
        r = math.ceil(0.008 * math.hypot(90, 130))
        disk = morphology.disk(r)
        gb, pb = boundary_map(gt), boundary_map(pred)
        precision = (pb & ndimage.binary_dilation(gb, disk)).sum() / pb.sum()
        recall = (gb & ndimage.binary_dilation(pb, disk)).sum() / gb.sum()
        assert boundary_f(gt, pred) == pytest.approx(2 * precision * recall / (precision + recall))


def test_overall_scores_are_means_over_objects():
    # two objects: J per frame [1, 0.5] and [0, 0, 0.3, 0.3]; F per frame [1, 1] and all 0.6
    res = summarize([([1.0, 0.5], [1.0, 1.0]), ([0.0, 0.0, 0.3, 0.3], [0.6] * 4), ([], [])])
    assert res["objects"] == 2  # the object without a scored frame is skipped
    assert res["J"] == pytest.approx((0.75 + 0.15) / 2)
    assert res["F"] == pytest.approx((1.0 + 0.6) / 2)
    assert res["J&F"] == pytest.approx((0.45 + 0.8) / 2)
    assert res["J-recall"] == pytest.approx((0.5 + 0.0) / 2)  # share of frames above 0.5
    assert summarize([])["J&F"] is None


# ------------------------------------------------------------------ propagation


def test_propagation_is_the_papers_affinity_rule():
    """The chunked top-k vote equals the dense definition: exp(cos / 0.1) restricted to the
    neighbourhood, all but the k largest over all context frames zeroed, columns normalized."""
    torch.manual_seed(0)
    h, w, d, s, c, radius, k = 6, 7, 16, 3, 3, 2, 5
    n = h * w
    src = F.normalize(torch.randn(s, n, d), dim=2)
    tgt = F.normalize(torch.randn(n, d), dim=1)
    lab = torch.softmax(torch.randn(s, c, n), 1)
    ours = propagate(tgt, src, lab, (h, w), k, radius, chunk_elems=50)
    i = torch.arange(n)
    near = ((i[:, None] // w - i[None] // w).abs() <= radius) & (
        (i[:, None] % w - i[None] % w).abs() <= radius
    )
    aff = torch.exp(torch.einsum("td,snd->snt", tgt, src) / 0.1) * near.T[None].float()
    aff = aff.reshape(s * n, n)
    kth = aff.topk(k, dim=0).values.min(0).values
    aff[aff < kth] = 0
    aff = aff / aff.sum(0, keepdim=True)
    dense = lab.permute(1, 0, 2).reshape(c, s * n) @ aff
    assert torch.allclose(ours, dense, atol=1e-5)


def test_context_holds_the_first_and_the_last_n_frames_only():
    torch.manual_seed(0)
    grid, d = (4, 4), 8
    first = torch.randn(16, d)
    ctx = LabelPropagation(first, torch.eye(2)[:, torch.arange(16) % 2], grid, TrackSettings())
    for _ in range(20):
        ctx(torch.randn(16, d))
    assert len(ctx.recent) == 7  # --n-last-frames
    assert ctx.first[0].shape == (16, d)


def test_labels_to_ids_upsamples_bilinearly_then_takes_the_argmax():
    # horizontal bands: along y the bilinear weights are 9/16 (own patch) vs 7/16 at most
    bands = torch.tensor([[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    onehot = F.one_hot(bands.reshape(-1), 3).T.float()
    out = labels_to_ids(onehot, (3, 3), 8, (24, 24))
    assert (out == np.kron(bands.numpy(), np.ones((8, 8), dtype=np.int64))).all()
    # a one-patch object in a corner loses its inner corner pixel: there the three background
    # patches weigh 1 - (9/16)^2 = 0.68 against the object's 0.32, as in the reference
    corner = torch.tensor([[1, 0], [0, 0]])
    out = labels_to_ids(F.one_hot(corner.reshape(-1), 2).T.float(), (2, 2), 8, (16, 16))
    assert out[0, 0] == 1 and out[4, 4] == 1 and out[7, 7] == 0 and out[0, 7] == 1
    # masks are resized (nearest) to the frame size at the end
    assert labels_to_ids(onehot, (3, 3), 8, (48, 30)).shape == (48, 30)


def test_working_size_as_the_reference():
    assert working_size(480, 854, 480, 16) == (480, 832)  # DAVIS landscape
    assert working_size(854, 480, 480, 8) == (832, 480)  # portrait
    assert working_size(64, 128, 64, 8) == (64, 128)
    assert working_size(480, 854, 240, 16) == (240, 384)


def test_read_mask_formats(tmp_path):
    ids = np.zeros((6, 8), np.uint8)
    ids[1:3, 1:4], ids[4, 5], ids[0, 7] = 1, 2, 255
    write_indexed_png(tmp_path / "p.png", ids, davis_palette())
    got = read_mask(tmp_path / "p.png")
    assert got[1, 1] == 1 and got[4, 5] == 2 and got[0, 7] == 0  # void counts as background
    Image.fromarray(np.where(ids == 1, 255, 0).astype(np.uint8)).save(tmp_path / "bw.png")
    assert (read_mask(tmp_path / "bw.png") == (ids == 1)).all()  # black/white: one object
    rgb = davis_palette()[np.where(ids == 255, 0, ids)]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert (read_mask(tmp_path / "rgb.png") == np.where(ids == 255, 0, ids)).all()
    rgb[2, 2] = (10, 200, 77)
    Image.fromarray(rgb).save(tmp_path / "odd.png")
    with pytest.raises(DinoError, match=r"\(10, 200, 77\) at pixel \(x=2, y=2\)"):
        read_mask(tmp_path / "odd.png")


# ------------------------------------------------------------------ whole videos


def colour_class_features(x: torch.Tensor) -> torch.Tensor:
    """'Perfect' features: the one-hot colour class (background, red, blue) of each 8x8 patch,
    read from the normalized frame itself."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (x * std + mean) * 255
    red = (rgb[0] > 170) & (rgb[2] < 90)
    blue = (rgb[2] > 170) & (rgb[0] < 90)
    cls = torch.zeros(rgb.shape[1:], dtype=torch.long)
    cls[red], cls[blue] = 1, 2
    votes = F.one_hot(cls, 3).permute(2, 0, 1).float()[None]
    return F.one_hot(F.avg_pool2d(votes, 8)[0].argmax(0), 3).float()


def test_perfect_features_give_jf_of_one(tmp_path):
    frames, masks = shapes_video(n=7, h=128, w=64, aligned=True)
    folder = tmp_path / "frames"
    gt = tmp_path / "gt"
    folder.mkdir()
    gt.mkdir()
    for t, (f, m) in enumerate(zip(frames, masks, strict=True)):
        Image.fromarray(f).save(folder / f"{t:03d}.png")
        write_indexed_png(gt / f"{t:03d}.png", m, davis_palette())
    video = Video("aligned", sorted(folder.iterdir()), gt / "000.png", gt)
    entry = track_video(
        video,
        colour_class_features,
        tmp_path / "out",
        8,
        IMAGENET_MEAN,
        IMAGENET_STD,
        TrackSettings(size=64),
    )
    assert entry["scored_frames"] == 5  # all but the first and the last
    assert entry["J"] == 1.0 and entry["F"] == 1.0 and entry["J&F"] == 1.0
    assert copy_first_mask_scores(masks) < 0.3  # the objects do move away
    written = read_mask(tmp_path / "out" / "006.png")
    assert (written == masks[6]).all()


def test_random_vit_beats_copying_the_first_mask(tmp_path):
    frames, masks = shapes_video(n=14)
    root = write_davis(tmp_path / "davis", {"shapes": (frames, masks)}, None)
    res = video_segmentation(
        lambda: __import__("dino").load_backbone("random", arch="vit_pico", patch_size=8),
        root,
        tmp_path / "out",
        settings=TrackSettings(size=64),
        device="cpu",
    )
    baseline = copy_first_mask_scores(masks)
    assert baseline < 0.3
    assert res["J&F"] > baseline + 0.3, (res["J&F"], baseline)
    assert set(res["videos"]["shapes"]["per_object"]) == {"1", "2"}
    assert 0 <= res["J"] <= 1 and 0 <= res["F"] <= 1


def test_track_command_on_a_davis_root(tmp_path, capsys):
    frames, masks = shapes_video(n=6)
    root = write_davis(
        tmp_path / "davis",
        {"a": (frames, masks), "b": (frames[:4], masks[:4]), "c": (frames[:3], masks[:3])},
        listed=["a", "b"],
    )
    out, res = tmp_path / "out", tmp_path / "res.json"
    code, stdout, err = run_cli(
        [
            "track",
            *RANDOM_PICO,
            "--data",
            str(root),
            "--output",
            str(out),
            "--json",
            str(res),
            "--size",
            "64",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    assert "J&F" in stdout and "fractions in [0, 1]" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]  # c is not in val.txt
    assert sorted(p.name for p in (out / "a").iterdir()) == [f"{t:05d}.png" for t in range(6)]
    with Image.open(out / "a" / "00003.png") as im:
        assert im.mode == "P" and im.size == (128, 64)
        assert np.asarray(im.getpalette()[:768]).reshape(256, 3).tolist() == (
            davis_palette().tolist()
        )
        assert set(np.unique(np.asarray(im))) <= {0, 1, 2}
    assert (read_mask(out / "a" / "00000.png") == masks[0]).all()  # the given mask, as is
    data = json.loads(res.read_text())
    assert {"J&F", "J", "F", "videos"} <= set(data)
    assert set(data["videos"]) == {"a", "b"}
    assert data["J&F"] == pytest.approx((data["J"] + data["F"]) / 2)
    assert data["videos"]["a"]["scored_frames"] == 4 and data["videos"]["b"]["scored_frames"] == 2


def test_track_command_on_a_folder_of_frames(tmp_path, capsys):
    frames, masks = shapes_video(n=5)
    folder, gt = tmp_path / "clip", tmp_path / "gt"
    folder.mkdir()
    gt.mkdir()
    for t, (f, m) in enumerate(zip(frames, masks, strict=True)):
        Image.fromarray(f).save(folder / f"frame{t}.jpg")
        write_indexed_png(gt / f"frame{t}.png", m, davis_palette())
    code, _, err = run_cli(
        [
            "track",
            *RANDOM_PICO,
            "--data",
            str(folder),
            "--first-mask",
            str(gt / "frame0.png"),
            "--annotations",
            str(gt),
            "--output",
            str(tmp_path / "out"),
            "--json",
            str(tmp_path / "r.json"),
            "--size",
            "64",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    assert len(list((tmp_path / "out" / "clip").glob("frame*.png"))) == 5
    assert json.loads((tmp_path / "r.json").read_text())["videos"]["clip"]["scored_frames"] == 3


# ------------------------------------------------------------------ bad input


def test_missing_first_frame_mask(tmp_path, capsys):
    frames, masks = shapes_video(n=4)
    root = write_davis(tmp_path / "davis", {"v": (frames, masks)}, None)
    (root / "Annotations/480p/v/00000.png").unlink()
    code, _, err = run_cli(
        ["track", *RANDOM_PICO, "--data", str(root), "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert "first-frame mask" in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_frames_of_different_sizes_fail_before_anything_is_written(tmp_path, capsys):
    frames, masks = shapes_video(n=4)
    root = write_davis(tmp_path / "davis", {"good": (frames, masks), "bad": (frames, masks)}, None)
    Image.fromarray(frames[2][:, :100]).save(root / "JPEGImages/480p/bad/00002.jpg")
    out = tmp_path / "o"
    (out / "earlier").mkdir(parents=True)
    (out / "earlier" / "00000.png").write_bytes(b"an earlier result")
    code, _, err = run_cli(
        ["track", *RANDOM_PICO, "--data", str(root), "--output", str(out)], capsys
    )
    assert code == 2
    line = one_error_line(err)
    assert "00002.jpg is 100x64 px" in line and "one size" in line
    assert sorted(p.name for p in out.iterdir()) == ["earlier"]  # no video was started
    assert (out / "earlier" / "00000.png").read_bytes() == b"an earlier result"


def test_mask_with_unknown_colours(tmp_path, capsys):
    frames, masks = shapes_video(n=3)
    folder = tmp_path / "clip"
    folder.mkdir()
    for t, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{t}.png")
    rgb = davis_palette()[masks[0]]
    rgb[masks[0] == 2] = (250, 120, 0)  # orange: no DAVIS id has it
    Image.fromarray(rgb).save(tmp_path / "mask.png")
    code, _, err = run_cli(
        [
            "track",
            *RANDOM_PICO,
            "--data",
            str(folder),
            "--first-mask",
            str(tmp_path / "mask.png"),
            "--output",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2
    assert "(250, 120, 0)" in one_error_line(err)


def test_earlier_masks_are_never_overwritten(tmp_path, capsys):
    frames, masks = shapes_video(n=3)
    root = write_davis(tmp_path / "davis", {"v": (frames, masks)}, None)
    out = tmp_path / "o"
    (out / "v").mkdir(parents=True)
    (out / "v" / "00001.png").write_bytes(b"earlier")
    code, _, err = run_cli(
        ["track", *RANDOM_PICO, "--data", str(root), "--output", str(out)], capsys
    )
    assert code == 2 and "earlier run" in one_error_line(err)
    assert (out / "v" / "00001.png").read_bytes() == b"earlier"
    res = tmp_path / "res.json"
    res.write_text("{}")
    code, _, err = run_cli(
        [
            "track",
            *RANDOM_PICO,
            "--data",
            str(root),
            "--output",
            str(tmp_path / "o2"),
            "--json",
            str(res),
        ],
        capsys,
    )
    assert code == 2 and "already exists" in one_error_line(err)
    assert res.read_text() == "{}" and not (tmp_path / "o2").exists()


def test_a_convnet_is_refused(tmp_path, capsys):
    frames, masks = shapes_video(n=3)
    root = write_davis(tmp_path / "davis", {"v": (frames, masks)}, None)
    code, _, err = run_cli(
        [
            "track",
            "--weights",
            "random",
            "--arch",
            "tv:resnet18",
            "--data",
            str(root),
            "--output",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2 and "not one" in one_error_line(err)
