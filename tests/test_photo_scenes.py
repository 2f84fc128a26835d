"""The built-in photo scenes (dino.data.photo_scenes): backgrounds independent of the class,
objects spread over the frame, clutter from other classes, exact masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dino
from dino.data.datasets import fashion_mnist, open_training_data
from dino.data.photo_scenes import (
    CLUTTER,
    KINDS,
    OBJECT_SIDE,
    PHOTOS,
    background_kind,
    make_photo_scenes,
    photo_scene_params,
)
from dino.data.scene_render import SCENE_SIZE, render_scenes


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    fm = fashion_mnist("test")
    return fm.images[:, 0], fm.labels


@pytest.fixture(scope="module")
def params(test_split: tuple[torch.Tensor, torch.Tensor]):
    sources, labels = test_split
    return photo_scene_params("test", range(3000), sources, labels)


def test_data_name_opens_the_photos_with_their_preset() -> None:
    d = open_training_data(PHOTOS, subset=5)
    for got, split in ((d.train, "train"), (d.knn_bank, "train"), (d.knn_query, "test")):
        want = make_photo_scenes(split, range(5))
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    cfg = dino.load_config(PHOTOS)
    assert cfg.data.data == PHOTOS
    from dino.config_load import default_preset

    assert default_preset(PHOTOS) == PHOTOS


def test_deterministic_batch_independent_and_not_the_old_scenes() -> None:
    a = make_photo_scenes("test", [3, 4, 5])
    b = make_photo_scenes("test", [5, 3], chunk=1)
    assert torch.equal(a.images[[2, 0]], b.images) and torch.equal(a.masks[[2, 0]], b.masks)
    assert torch.equal(a.background[[2, 0]], b.background)
    assert a.images.shape == (3, 3, SCENE_SIZE, SCENE_SIZE) and a.name == f"{PHOTOS}/test"
    assert not torch.equal(make_photo_scenes("test", [3], seed=1).images[0], a.images[0])
    from dino.data.scenes import make_scenes

    assert not torch.equal(make_scenes("test", [3]).images[0], a.images[0])


def test_background_kind_is_independent_of_the_class(params) -> None:
    """Every kind appears with every class, as often as chance says: a chi-square test of
    independence of the (class, dominant kind) table of 3000 test scenes."""
    p, region_kinds = params
    kinds = background_kind(p, region_kinds)
    labels = fashion_mnist("test").labels[:3000].numpy()
    table = np.zeros((10, len(KINDS)))
    np.add.at(table, (labels, kinds), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    dof = 9 * (len(KINDS) - 1)
    assert chi2 < dof + 4 * np.sqrt(2 * dof), chi2  # far below a dependent table's value
    assert (table > 0).all()
    # every region's kind, not only the dominant one, is uniform over the pool
    present = np.isfinite(p.points[..., 0])
    counts = np.bincount(region_kinds[present], minlength=len(KINDS))
    assert counts.min() > 0.8 * counts.mean()
    # and a region's colours are its kind's: the mean hue of grass regions is green's
    grass = region_kinds == 0
    assert (p.colors[grass][..., 1] > p.colors[grass][..., 2]).mean() > 0.9  # green over blue


def test_clutter_never_comes_from_the_objects_class(test_split, params) -> None:
    _, labels = test_split
    p, _ = params
    own = labels[:3000].numpy()
    clutter = labels.numpy()[p.source[:, :-1]]
    assert (clutter != own[:, None]).all()
    count = p.present[:, :-1].sum(1)
    assert count.min() == CLUTTER[0] and count.max() == CLUTTER[1]
    assert p.source[:, -1].tolist() == list(range(3000))  # the object: scene i holds image i


def test_objects_are_spread_over_the_frame_and_vary_in_size(params) -> None:
    p, _ = params
    side = p.scale[:, -1] * 28
    assert side.min() >= OBJECT_SIDE[0] - 1e-6 and side.max() <= OBJECT_SIDE[1] + 1e-6
    assert np.percentile(side, 10) < 30 and np.percentile(side, 90) > 44
    cy, cx = p.y[:, -1] + side / 2, p.x[:, -1] + side / 2
    assert (p.y[:, -1] >= 0).all() and (p.y[:, -1] + side <= SCENE_SIZE + 1e-6).all()
    # centres far from the frame's centre are common (unlike a centred layout)
    off = np.hypot(cy - 32, cx - 32)
    assert np.mean(off > 12) > 0.2


def test_mask_is_exactly_the_objects_pixels(test_split) -> None:
    """Removing the object changes exactly the masked pixels (up to the shared noise, the
    same in both renderings)."""
    sources, labels = test_split
    p, _ = photo_scene_params("test", range(64), sources, labels)
    with_obj, masks = render_scenes(sources, p)
    p.present[:, -1] = False
    without, empty = render_scenes(sources, p)
    assert not empty.any()
    changed = (with_obj.int() - without.int()).abs().amax(1) > 0
    assert (changed & ~masks).sum() == 0
    assert (masks & ~changed).float().mean() < 0.01 * masks.float().mean()  # same colour: rare
    assert masks.flatten(1).any(1).all()


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        make_photo_scenes("val", [0])
    with pytest.raises(ValueError, match="indices"):
        make_photo_scenes("test", [10_000])


def test_make_scenes_writes_a_folder_segment_scores_like_the_builtin(tmp_path, capsys) -> None:
    """`dino make-scenes` writes train/val class folders and val masks; `dino segment --data
    DIR/val --masks DIR/val-masks --score` on them gives the scores of the same scenes scored
    as the built-in dataset (same network, same normalization)."""
    import json

    from dino.cli import main

    out = tmp_path / "photos"
    assert main(["make-scenes", str(out), "--train", "12", "--val", "8"]) == 0
    want = make_photo_scenes("test", range(8))
    files = sorted((out / "val").rglob("*.png"))
    assert len(files) == 8 and len(list((out / "train").rglob("*.png"))) == 12
    # one folder per class, '/' in a name replaced: every file two levels down
    folders = {p.name for p in (out / "train").iterdir()}
    assert folders == {c.replace("/", "-") for c in want.classes} and "T-shirt-top" in folders
    assert all(f.parent.parent == out / "train" for f in (out / "train").rglob("*.png"))
    from PIL import Image

    for f in files:
        i = int(f.stem)
        assert f.parent.name == want.classes[int(want.labels[i])].replace("/", "-")
        pix = torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1)
        assert torch.equal(pix, want.images[i])
        mask = np.array(Image.open(out / "val-masks" / f.parent.name / f.name)) > 0
        assert np.array_equal(mask, want.masks[i].numpy())
    # an existing folder is never written into
    assert main(["make-scenes", str(out), "--train", "1", "--val", "1"]) == 2
    assert "exists" in capsys.readouterr().err

    net = ["--weights", "random", "--arch", "vit_pico", "--patch-size", "8"]
    norm = ["--mean", "0.4", "0.4", "0.4", "--std", "0.2", "0.2", "0.2"]
    scores = {}
    folder = ["--data", str(out / "val"), "--masks", str(out / "val-masks"), "--image-size", "64"]
    for name, data in (("folder", folder),
                       ("builtin", ["--data", PHOTOS, "--subset", "8"])):  # fmt: skip
        j = tmp_path / f"{name}.json"
        assert main(["segment", *net, *norm, *data, "--score", "--json", str(j)]) == 0
        scores[name] = json.loads(j.read_text())
    assert scores["folder"]["images"] == scores["builtin"]["images"] == 8
    for key, value in scores["builtin"]["jaccard"].items():
        assert scores["folder"]["jaccard"][key] == pytest.approx(value, abs=1e-6), key


def test_the_preset_keeps_its_steps_on_a_folder_of_fewer_scenes() -> None:
    """`dino train --config fashion-mnist-photos --data FOLDER` on 4 000 scenes gets the steps
    the preset makes on the 60 000 built-in ones (more epochs), not 1/15 of them."""
    from dino.training.schedules import stretch_to_min_steps

    cfg = dino.load_config(PHOTOS)
    o = cfg.optim
    builtin_steps = o.epochs * (60000 // o.batch_size)
    assert o.min_steps == builtin_steps
    cfg.data.data = "/some/folder"
    stretched, factor = stretch_to_min_steps(cfg, 4000 // o.batch_size)
    assert stretched.optim.epochs * (4000 // o.batch_size) >= builtin_steps
    assert stretched.optim.warmup_epochs == pytest.approx(o.warmup_epochs * factor)
