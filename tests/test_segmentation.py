"""Segmentation scoring (dino.eval.segmentation) and its pictures, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino.errors import DinoError
from dino.eval.attention import attention_masks
from dino.eval.segmentation import (
    centre_prior,
    jaccard,
    paired_files,
    pca_foreground,
    prepare_pair,
    read_mask,
    score_folder,
    score_tensors,
    segment,
    upsample_grid,
)
from dino.models.backbones import build_backbone
from dino.viz.pca import foreground_picture, pca_picture
from dino.viz.segmentation import save_segmentation, segmentation_sheet


def test_jaccard_hand_computed() -> None:
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = torch.zeros(4, 4, dtype=torch.bool)
    a[0:2, 0:2] = True  # 4 pixels
    b[1:3, 1:3] = True  # 4 pixels, 1 shared
    assert jaccard(a, b).item() == pytest.approx(1 / 7)
    assert jaccard(a, a).item() == 1.0
    assert jaccard(a, ~a).item() == 0.0
    empty = torch.zeros(4, 4, dtype=torch.bool)
    assert jaccard(empty, empty).item() == 1.0  # nothing to find, nothing found
    assert jaccard(empty, a).item() == 0.0
    # batched: one value per mask
    both = jaccard(torch.stack([a, a]), torch.stack([b, a]))
    assert both.tolist() == pytest.approx([1 / 7, 1.0])


def test_sixty_percent_mass_hand_computed() -> None:
    # masses 0.5, 0.2, 0.15, 0.1, 0.05: 0.5 < 0.6, 0.5 + 0.2 >= 0.6 -> the two largest
    att = torch.tensor([[0.1, 0.5], [0.05, 0.2], [0.15, 0.0]]).reshape(1, 1, 3, 2)
    att = att / att.sum()
    mask = attention_masks(att, 0.6)[0, 0]
    assert mask.tolist() == [[False, True], [False, True], [False, False]]
    # exactly 0.6 reached by the first patch: only it
    att = torch.tensor([0.6, 0.3, 0.1]).reshape(1, 1, 1, 3)
    assert attention_masks(att, 0.6)[0, 0, 0].tolist() == [True, False, False]
    # uniform attention over 8 patches (1/8 each, exact in binary): 4 hold 50 %, 5 hold 62.5 %
    assert attention_masks(torch.full((1, 1, 2, 4), 0.125), 0.6).sum().item() == 5
    # scale does not matter: unnormalized maps give the same masks
    assert attention_masks(torch.full((1, 1, 2, 4), 4.0), 0.6).sum().item() == 5


def test_upsample_grid_is_nearest_patch() -> None:
    grid = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    up = upsample_grid(grid, (4, 6))
    assert up.shape == (4, 6)
    assert up[:2, :3].all() and up[2:, 3:].all()
    assert not up[:2, 3:].any() and not up[2:, :3].any()


def test_centre_prior_has_the_area_and_is_centred() -> None:
    m = centre_prior(4, (4, 4))
    assert m.tolist() == [
        [False, False, False, False],
        [False, True, True, False],
        [False, True, True, False],
        [False, False, False, False],
    ]
    for area in (0, 1, 37, 200, 4096):
        assert centre_prior(area, (64, 64)).sum().item() == area
    big = centre_prior(300, (64, 64))
    ys, xs = torch.nonzero(big, as_tuple=True)
    assert ys.float().mean().item() == pytest.approx(31.5, abs=0.5)
    assert xs.float().mean().item() == pytest.approx(31.5, abs=0.5)


def test_pca_foreground_separates_two_kinds_of_patches() -> None:
    """A 6x6 grid of two kinds of features: the block in the middle is the foreground (the other
    kind covers the border), whatever sign the SVD gives the first component."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 6, 16, generator=gen) * 0.05
    fg = torch.zeros(6, 6, dtype=torch.bool)
    fg[2:5, 1:4] = True
    for direction in (1.0, -1.0):
        f = feats.clone()
        f[fg] += direction * torch.linspace(1, 2, 16)
        rgb, mask = pca_foreground(f)
        assert torch.equal(mask, fg)
        assert rgb.shape == (6, 6, 3)
        assert rgb.min() >= 0 and rgb.max() <= 1
    # deterministic
    rgb2, mask2 = pca_foreground(f)
    assert torch.equal(rgb, rgb2) and torch.equal(mask, mask2)


def test_pca_picture_shapes() -> None:
    rgb = torch.rand(4, 5, 3)
    pic = pca_picture(rgb, (40, 32))  # (width, height)
    assert pic.size == (40, 32) and pic.mode == "RGB"
    arr = np.asarray(pic)
    # each 8x8 block is one patch's colour
    assert (arr[:8, :8] == np.round(rgb[0, 0].numpy() * 255)).all()
    fg = torch.zeros(4, 5, dtype=torch.bool)
    fg[1, 2] = True
    pic = np.asarray(foreground_picture(rgb, fg, (40, 32)))
    assert pic[:8].max() == 0 and pic[8:16, 16:24].max() > 0


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_pico", 8, 32, 2).eval()


def test_segment_shapes_and_determinism(tiny_vit: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 40)
    a, b = segment(tiny_vit, x), segment(tiny_vit, x)
    assert a.attention.shape == (2, 3, 4, 5)
    assert a.masks.shape == (2, 3, 4, 5) and a.masks.dtype == torch.bool
    assert a.pca_rgb.shape == (2, 4, 5, 3)
    assert a.pca_mask.shape == (2, 4, 5)
    assert torch.equal(a.pca_rgb, b.pca_rgb) and torch.equal(a.masks, b.masks)
    # each head's attention over the patches: [CLS] keeps the rest for itself
    total = a.attention.sum((-2, -1))
    assert (total > 0).all() and (total < 1).all()


def test_score_tensors_reports_percent_and_best_head(tiny_vit: torch.nn.Module) -> None:
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    res = score_tensors(tiny_vit, images, masks, [0.5] * 3, [0.25] * 3, batch_size=2)
    assert res["images"] == 3
    j = res["jaccard"]
    assert set(j) == {"attention_best_head", "attention_mean", "pca", "centre_prior"}
    assert j["attention_best_head"] == max(res["per_head"])
    assert j["attention_mean"] == pytest.approx(sum(res["per_head"]) / 3, abs=0.02)
    # the centre prior of a centred square of 256 pixels is the disc of 256 pixels around the
    # centre: computed by hand from its definition
    prior = centre_prior(256, (32, 32))
    expected = (prior & masks[0]).sum().item() / (prior | masks[0]).sum().item()
    assert j["centre_prior"] == pytest.approx(100 * expected, abs=0.01)
    # the attention masks recomputed by hand from the attention
    seg = segment(tiny_vit, (images.float() / 255 - 0.5) / 0.25)
    per = jaccard(upsample_grid(seg.masks, (32, 32)), masks[:, None]).mean(0)
    assert res["per_head"] == pytest.approx((100 * per).tolist(), abs=0.01)


def test_convnet_asked_for_attention_is_one_sentence() -> None:
    net = build_backbone("tv:resnet18").eval()
    with pytest.raises(DinoError, match="attention maps need a ViT backbone"):
        segment(net, torch.randn(1, 3, 32, 32))


def test_pictures_written(tmp_path, tiny_vit: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    seg = segment(tiny_vit, x)
    pic = Image.new("RGB", (32, 32), (10, 200, 30))
    truth = torch.zeros(32, 32, dtype=torch.bool)
    written = save_segmentation(pic, seg, 1, tmp_path / "one", truth)
    names = {p.name for p in written}
    assert {"image.png", "pca.png", "pca-foreground.png", "overview.png", "true-mask.png"} <= names
    assert {f"attn-head{h}.png" for h in range(3)} <= names
    assert Image.open(tmp_path / "one" / "pca.png").size == (32, 32)
    assert np.load(tmp_path / "one" / "attention.npy").shape == (3, 4, 4)
    sheet = segmentation_sheet([pic, pic], seg, torch.stack([truth, truth]))
    assert sheet.height > 2 * 128


# ------------------------------------------------------------------ a folder of images + masks


def _write_pair(folder, masks, name: str, size=(32, 32), mask_size=None) -> None:
    Image.fromarray(np.full((*size[::-1], 3), 128, np.uint8)).save(folder / f"{name}.jpg")
    m = np.zeros((mask_size or size)[::-1], np.uint8)
    m[8:20, 8:20] = 255
    Image.fromarray(m).save(masks / f"{name}.png")


def test_folder_scoring(tmp_path, tiny_vit: torch.nn.Module) -> None:
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    for n in ("a", "b"):
        _write_pair(imgs, masks, n, size=(36, 33))
    assert [p[1].name for p in paired_files(imgs, masks)] == ["a.png", "b.png"]
    res = score_folder(tiny_vit, imgs, masks, [0.5] * 3, [0.25] * 3)
    assert res["images"] == 2
    # cropped to 32x32 like the image: the mask keeps its place relative to the crop
    img = Image.open(imgs / "a.jpg").convert("RGB")
    pix, m = prepare_pair(img, read_mask(masks / "a.png"), 8, None, "a")
    assert pix.shape == (3, 32, 32) and m.shape == (32, 32)
    assert m.sum().item() == 144 and m[8, 6] and not m[8, 5]  # left crop offset 2


def test_mask_of_another_size_is_one_sentence(tmp_path, tiny_vit: torch.nn.Module) -> None:
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    _write_pair(imgs, masks, "a", size=(32, 32), mask_size=(30, 32))
    with pytest.raises(DinoError, match=r"mask of .*a\.jpg is 30x32 pixels but the image is 32x32"):
        score_folder(tiny_vit, imgs, masks, [0.5] * 3, [0.25] * 3)


def test_missing_masks_are_listed(tmp_path, tiny_vit: torch.nn.Module) -> None:
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    _write_pair(imgs, masks, "a")
    _write_pair(imgs, masks, "b")
    (masks / "b.png").unlink()
    with pytest.raises(DinoError, match=r"1 of 2 images have no mask .*missing: b\.png"):
        score_folder(tiny_vit, imgs, masks, [0.5] * 3, [0.25] * 3)
    with pytest.raises(DinoError, match="not a folder"):
        paired_files(imgs, tmp_path / "nope")


# ------------------------------------------------------------------ the command


def _dino(argv: list[str], capsys) -> tuple[int, str, str]:
    from dino.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_segment_command_scores_scenes(tmp_path, capsys) -> None:
    """The stable interface: --data fashion-mnist-scenes --score --json OUT (here on 16 scenes
    of a random network)."""
    import json

    out = tmp_path / "scores.json"
    out.write_text("an earlier result, replaced when the new one is complete")
    weights = ["--weights", "random", "--arch", "vit_pico", "--patch-size", "8"]
    argv = ["segment", *weights, "--data", "fashion-mnist-scenes", "--score", "--subset", "16"]
    code, stdout, _ = _dino([*argv, "--json", str(out), "--pictures", "1", "--output",
                             str(tmp_path / "pics")], capsys)  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    assert set(res["jaccard"]) == {"attention_best_head", "attention_mean", "pca", "centre_prior"}
    assert res["images"] == 16
    assert all(0 <= v <= 100 for v in res["jaccard"].values())
    assert "centre prior" in stdout
    assert (tmp_path / "pics" / "scene-00000" / "overview.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--score"], "--score needs --data"),
        (["--data", "fashion-mnist-scenes", "--json", "x.json"], "--json writes the scores"),
        (["--data", "somewhere", "--score"], "needs its true masks"),
        (["--data", "fashion-mnist-scenes", "--masks", "m"], "--masks goes with --data FOLDER"),
        ([], "nothing to segment"),
    ],
)
def test_segment_command_bad_flags(argv: list[str], message: str, capsys) -> None:
    weights = ["--weights", "random", "--arch", "vit_pico", "--patch-size", "8"]
    code, _, err = _dino(["segment", *weights, *argv], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_segment_command_convnet(tmp_path, capsys) -> None:
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    code, _, err = _dino(
        ["segment", "--weights", "random", "--arch", "tv:resnet18", str(img), "--output",
         str(tmp_path / "out")], capsys,
    )  # fmt: skip
    assert code == 2 and "attention maps need a ViT backbone" in err
    assert not (tmp_path / "out").exists()
