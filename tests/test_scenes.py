"""The built-in scene dataset (dino.data.scenes): deterministic, exact masks, right objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dino
from dino.data import scene_render
from dino.data.datasets import fashion_mnist, open_training_data
from dino.data.scene_render import INK, SCENE_SIZE, render_scenes
from dino.data.scenes import make_scenes, scene_params


@pytest.fixture(scope="module")
def test_sources() -> torch.Tensor:
    return fashion_mnist("test").images[:, 0]


def test_data_name_opens_the_generated_scenes() -> None:
    """``--data fashion-mnist-scenes`` trains on the train split's scenes (also the k-NN bank)
    and queries k-NN with the test split's; its preset names it."""
    d = open_training_data("fashion-mnist-scenes", subset=6)
    for got, split in ((d.train, "train"), (d.knn_bank, "train"), (d.knn_query, "test")):
        want = make_scenes(split, range(6))
        assert len(got) == 6 and torch.equal(got.images, want.images)
        assert torch.equal(got.labels, want.labels) and got.classes == want.classes
    assert dino.load_config("fashion-mnist-scenes").data.data == "fashion-mnist-scenes"


def test_scenes_are_deterministic_and_batch_independent() -> None:
    a = make_scenes("test", [3, 4, 5, 6])
    b = make_scenes("test", [6, 5])  # another batch, another order
    c = make_scenes("test", [4, 5, 6, 3], chunk=1)
    for i, j in ((3, 0), (2, 1)):
        assert torch.equal(a.images[i], b.images[j])
        assert torch.equal(a.masks[i], b.masks[j])
    assert torch.equal(a.images[[1, 2, 3, 0]], c.images)
    assert a.images.shape == (4, 3, SCENE_SIZE, SCENE_SIZE) and a.images.dtype == torch.uint8
    assert a.masks.dtype == torch.bool
    # another seed, another scene
    d = make_scenes("test", [3], seed=1)
    assert not torch.equal(d.images[0], a.images[0])


def test_labels_are_the_objects_classes() -> None:
    fm = fashion_mnist("test")
    s = make_scenes("test", [0, 1, 2, 9999])
    assert s.labels.tolist() == fm.labels[[0, 1, 2, 9999]].tolist()
    assert s.classes == fm.classes
    assert s.name == "fashion-mnist-scenes/test"


def test_train_and_test_scenes_hold_their_splits_objects() -> None:
    # train scene 0 holds train image 0: its mask has that image's ink pattern, not the test one's
    for split in ("train", "test"):
        src = fashion_mnist(split).images[:, 0]
        p = scene_params(split, [0], src)
        assert p.source[0, -1] == 0
        assert (p.source[0, :-1] != 0).all()  # fragments never come from the object's image
        assert p.source.max() < src.shape[0]


def test_mask_is_exactly_the_objects_painted_pixels(test_sources: torch.Tensor) -> None:
    # a hand-placed 28x28 square of full ink at scale 1 covers exactly its 28x28 pixels
    sources = torch.zeros(3, 28, 28, dtype=torch.uint8)
    sources[2] = 255
    p = scene_params("test", [2], sources)
    p.y[0, -1], p.x[0, -1], p.scale[0, -1] = 20.0, 10.0, 1.0
    p.present[0, :-1] = False  # no fragments
    p.noise[:] = 0.0
    p.tint[0, -1] = (1.0, 0.0, 0.5)
    images, masks = render_scenes(sources, p)
    expected = torch.zeros(SCENE_SIZE, SCENE_SIZE, dtype=torch.bool)
    expected[20:48, 10:38] = True
    assert torch.equal(masks[0], expected)
    # inside: the tint at full ink (0.3 + 0.7 * 1); outside: the background, not the tint
    inside = images[0][:, expected].int()
    assert (inside - torch.tensor([255, 0, 128])[:, None]).abs().max() <= 1  # 127.5: rounding


def test_mask_is_where_the_object_changes_the_picture(test_sources: torch.Tensor) -> None:
    """Recolouring the object changes the pixels of its mask and no other (real garments, with
    fragments, noise and the object partly over fragments)."""
    idx = list(range(8))
    p = scene_params("test", idx, test_sources)
    images, masks = render_scenes(test_sources, p)
    q = scene_params("test", idx, test_sources)
    q.tint[:, -1] = 1.0 - q.tint[:, -1]  # another colour
    q.noise[:] = p.noise
    other, masks2 = render_scenes(test_sources, q)
    assert torch.equal(masks, masks2)
    changed = (images != other).any(1)
    assert not changed[~masks].any()  # nothing outside the mask moved
    # inside, almost every pixel moved (a few may be clipped to the same 0 or 255)
    assert changed[masks].float().mean() > 0.95
    for i in idx:
        assert masks[i].sum() > 0


def test_mask_matches_the_resampled_garment(test_sources: torch.Tensor) -> None:
    """The mask of a scene equals the object image resampled to its place, thresholded at INK
    (a bilinear resize by an independent route: torch's interpolate of the padded source)."""
    sources = torch.zeros(1, 28, 28, dtype=torch.uint8)
    sources[0] = test_sources[0]
    p = scene_params("test", [0], torch.cat([sources, sources]))
    p.present[0, :-1] = False
    p.y[0, -1], p.x[0, -1], p.scale[0, -1], p.flip[0, -1] = 8.0, 16.0, 1.5, False
    _images, masks = render_scenes(torch.cat([sources, sources]), p)
    # scale 1.5 exactly: the 28 px garment becomes 42 px at (8, 16)
    up = torch.nn.functional.interpolate(
        sources[None].float() / 255, size=(42, 42), mode="bilinear", align_corners=False
    )[0, 0]
    expected = torch.zeros(SCENE_SIZE, SCENE_SIZE, dtype=torch.bool)
    expected[8:50, 16:58] = up > INK
    differ = (masks[0] != expected).sum().item()
    # interpolate clamps at the edge where grid_sample pads with zeros: only the outermost ring
    # of the 42x42 box may differ, and the garment's ink rarely reaches it
    ring = expected.clone()
    ring[9:49, 17:57] = False
    assert differ <= ring.sum().item()
    assert (masks[0] == expected)[9:49, 17:57].all()


def test_background_is_not_separable_by_brightness() -> None:
    """The object is not simply the brightest or darkest part: its mean brightness is above the
    background's in some scenes and below in others, in comparable numbers."""
    s = make_scenes("test", range(200))
    lum = s.images.float().mean(1)
    inside = (lum * s.masks).sum((1, 2)) / s.masks.sum((1, 2))
    outside = (lum * ~s.masks).sum((1, 2)) / (~s.masks).sum((1, 2))
    brighter = (inside > outside).float().mean().item()
    assert 0.25 < brighter < 0.75
    area = s.masks.float().mean((1, 2))
    assert 0.05 < area.mean() < 0.35


def test_hsv_to_rgb_matches_colorsys() -> None:
    import colorsys

    rng = np.random.default_rng(0)
    hsv = rng.random((50, 3))
    ours = scene_render.hsv_to_rgb(hsv)
    ref = np.array([colorsys.hsv_to_rgb(*c) for c in hsv])
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_bad_split_and_indices() -> None:
    with pytest.raises(ValueError, match="train or test"):
        scene_params("val", [0], torch.zeros(2, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..9999"):
        make_scenes("test", [10000])
