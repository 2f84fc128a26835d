"""Multi-crop augmentation (docs/recipe.md, "Multi-crop views"): the batched tensor path, its
RandomResizedCrop box sampling, the PIL path, and the counter-based randomness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from dino.config import DataConfig
from dino.data.crop_draws import ViewSpec, crop_boxes
from dino.data.multicrop import MultiCropTransform
from dino.data.seeding import sample_keys, sample_seed, uniforms
from dino.data.tensor_aug import TensorMultiCrop

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
N_LOCAL = 3


def make_aug(
    n_local: int = N_LOCAL,
    global_size: int = 28,
    local_size: int = 12,
    **kw,
) -> TensorMultiCrop:
    views = [
        ViewSpec(global_size, (0.4, 1.0), 1.0, 0.0),
        ViewSpec(global_size, (0.4, 1.0), 0.1, 0.2),
    ] + [ViewSpec(local_size, (0.05, 0.4), 0.5, 0.0)] * n_local
    args = dict(
        brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, color_jitter_p=0.8,
        grayscale_p=0.2, blur_sigma=(0.1, 2.0), mean=MEAN, std=STD,
    )  # fmt: skip
    args.update(kw)
    return TensorMultiCrop(views, **args)


def images(n: int, channels: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def unnormalize(v: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return v * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


# ------------------------------------------------------------------ TensorMultiCrop


@pytest.mark.parametrize("channels", [1, 3])
def test_tensor_views_number_sizes_and_range(channels: int) -> None:
    aug = make_aug()
    imgs = images(4, channels)
    views = aug(imgs, np.arange(4), epoch=0, seed=0)
    assert len(views) == 2 + N_LOCAL
    for v in views[:2]:
        assert v.shape == (4, 3, 28, 28)
    for v in views[2:]:
        assert v.shape == (4, 3, 12, 12)
    for v in views:
        assert v.dtype == torch.float32
        assert torch.isfinite(v).all()
        raw = unnormalize(v)
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    if channels == 1:  # a gray input gives 3 equal channels (after undoing the normalization)
        for v in views:
            raw = unnormalize(v)
            torch.testing.assert_close(raw[:, 0], raw[:, 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(raw[:, 0], raw[:, 2], atol=1e-5, rtol=0)


def test_tensor_views_no_local_crops() -> None:
    views = make_aug(n_local=0)(images(2, 3), np.arange(2), epoch=0, seed=0)
    assert len(views) == 2


@pytest.mark.parametrize("channels", [1, 3])
def test_tensor_views_independent_of_batch_composition(channels: int) -> None:
    aug = make_aug()
    data = images(10, channels)
    batch = np.array([3, 5, 7])
    many = aug(data[batch], batch, epoch=2, seed=11)
    alone = aug(data[[5]], np.array([5]), epoch=2, seed=11)
    for v_many, v_alone in zip(many, alone, strict=True):
        torch.testing.assert_close(v_many[1:2], v_alone)
    # and repeated calls give the same views
    again = aug(data[batch], batch, epoch=2, seed=11)
    for a, b in zip(many, again, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_tensor_views_differ_across_epochs_seeds_and_views() -> None:
    aug = make_aug()
    data = images(4, 3)
    idx = np.arange(4)
    e0 = aug(data, idx, epoch=0, seed=0)
    e1 = aug(data, idx, epoch=1, seed=0)
    s1 = aug(data, idx, epoch=0, seed=1)
    for a, b, c in zip(e0, e1, s1, strict=True):
        assert not torch.allclose(a, b)
        assert not torch.allclose(a, c)
    assert not torch.allclose(e0[2], e0[3])  # two local views of the same image differ


def test_tensor_full_crop_without_color_ops_is_identity() -> None:
    """scale (1, 1) on a square image is the whole image; with no jitter, blur, solarization
    or grayscale the view is the image itself (mean 0, std 1), possibly mirrored."""
    aug = TensorMultiCrop(
        [ViewSpec(16, (1.0, 1.0), 0.0, 0.0)], 0.4, 0.4, 0.2, 0.1, 0.0, 0.0, (0.1, 2.0),
        (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
    )  # fmt: skip
    data = images(6, 3, size=16)
    (v,) = aug(data, np.arange(6), epoch=0, seed=0)
    x = data.float() / 255
    for i in range(6):
        same = torch.allclose(v[i], x[i], atol=1e-5)
        mirrored = torch.allclose(v[i], x[i].flip(-1), atol=1e-5)
        assert same or mirrored


def test_tensor_flip_probability_is_half() -> None:
    aug = TensorMultiCrop(
        [ViewSpec(8, (1.0, 1.0), 0.0, 0.0)], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, (0.1, 2.0),
        (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
    )  # fmt: skip
    ramp = (torch.arange(8, dtype=torch.float32) * 30).to(torch.uint8)
    data = ramp.view(1, 1, 1, 8).expand(400, 1, 8, 8).contiguous()
    (v,) = aug(data, np.arange(400), epoch=0, seed=0)
    flipped = (v[:, 0, 0, 0] > v[:, 0, 0, -1]).float().mean().item()
    assert 0.4 < flipped < 0.6


def test_tensor_solarize_p1_inverts_pixels_at_or_above_128() -> None:
    values = [0, 50, 126, 127, 128, 129, 200, 255]
    # rows of constant value: flipping does not matter
    img = torch.tensor(values, dtype=torch.uint8).view(1, 1, 8, 1).expand(1, 1, 8, 8)
    img = img.repeat(3, 1, 1, 1)  # three samples (different random draws)

    def run(solarize_p: float) -> torch.Tensor:
        aug = TensorMultiCrop(
            [ViewSpec(8, (1.0, 1.0), 0.0, solarize_p)], 0.4, 0.4, 0.2, 0.1, 0.0, 0.0, (0.1, 2.0),
            (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
        )  # fmt: skip
        (v,) = aug(img, np.arange(3), epoch=0, seed=0)
        return v[:, 0]

    expected = torch.tensor([v if v < 128 else 255 - v for v in values], dtype=torch.float32)
    expected = (expected / 255).view(1, 8, 1).expand(3, 8, 8)
    torch.testing.assert_close(run(1.0), expected, atol=1e-5, rtol=0)
    plain = (torch.tensor(values, dtype=torch.float32) / 255).view(1, 8, 1).expand(3, 8, 8)
    torch.testing.assert_close(run(0.0), plain, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ crop_boxes


def test_crop_boxes_hand_computed_first_attempt() -> None:
    u = np.zeros((2, 40))
    u[0, :4] = [0.5, 0.5, 0.0, 0.0]
    u[1, :4] = [0.5, 0.5, 0.999, 0.999]
    boxes = crop_boxes(u, 100, 100, (0.2, 0.6))
    # target area 0.4 * 10000 = 4000, ratio exp(0) = 1 -> w = h = round(63.25) = 63
    np.testing.assert_array_equal(boxes[0], [0, 0, 63, 63])
    # top = floor(0.999 * (100 - 63 + 1)) = 37
    np.testing.assert_array_equal(boxes[1], [37, 37, 63, 63])


def test_crop_boxes_skips_attempts_that_do_not_fit() -> None:
    u = np.full((1, 40), 0.5)
    u[0, 0:4] = [1.0, 1.0, 0.0, 0.0]  # area 1.0 and ratio 4/3: w = 115 > 100, does not fit
    u[0, 4:8] = [0.0, 0.5, 0.0, 0.0]  # area 0.2 * 10000, ratio 1: w = h = round(44.72) = 45
    boxes = crop_boxes(u, 100, 100, (0.2, 1.0))
    np.testing.assert_array_equal(boxes[0], [0, 0, 45, 45])


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (20, 60, [0, 16, 20, 27]),  # too wide: h = 20, w = round(20 * 4 / 3) = 27, centered
        (60, 20, [16, 0, 27, 20]),  # too tall: w = 20, h = round(20 / (3 / 4)) = 27
        (30, 30, [0, 0, 30, 30]),  # in range: the whole image
    ],
)
def test_crop_boxes_fallback_matches_torchvision(height: int, width: int, expected) -> None:
    # no attempt can fit an area of 0.95..1.0 of the image with a ratio in [3/4, 4/3] when the
    # image is out of that ratio range; for the square case we force w > width via u = 1.
    u = np.ones((1, 40))
    scale = (0.95, 1.0)
    boxes = crop_boxes(u, height, width, scale)
    np.testing.assert_array_equal(boxes[0], expected)
    if height != width:  # torchvision also ends in its fallback there
        tv = RandomResizedCrop.get_params(
            torch.empty(1, height, width), list(scale), [3 / 4, 4 / 3]
        )
        assert list(tv) == expected


def _box_stats(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T
    return {
        "area": h * w / (height * width),
        "ratio": w / h,
        "center_y": (top + h / 2) / height,
        "center_x": (left + w / 2) / width,
    }


@pytest.mark.parametrize(
    ("height", "width", "scale"),
    [(28, 28, (0.4, 1.0)), (28, 28, (0.05, 0.4)), (20, 60, (0.4, 1.0)), (40, 24, (0.14, 1.0))],
)
def test_crop_boxes_distribution_matches_torchvision(height, width, scale) -> None:
    n = 2000
    u = uniforms(sample_keys(3, 0, np.arange(n)), 40)
    ours = crop_boxes(u, height, width, scale)
    torch.manual_seed(0)
    ref = np.array(
        [RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), [3 / 4, 4 / 3])
         for _ in range(n)],
        dtype=np.float64,
    )  # fmt: skip
    # every box lies inside the image
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    assert np.allclose(ours, np.round(ours))
    a, b = _box_stats(ours, height, width), _box_stats(ref, height, width)
    for key in a:
        se = math.sqrt(a[key].var() / n + b[key].var() / n)
        assert abs(a[key].mean() - b[key].mean()) < 4 * se + 1e-3, key


def test_crop_boxes_area_within_scale_range() -> None:
    height, width, scale = 200, 150, (0.05, 0.4)
    n = 2000
    u = uniforms(sample_keys(0, 0, np.arange(n)), 40)
    boxes = crop_boxes(u, height, width, scale)
    _, _, h, w = boxes.T
    area = height * width
    # a whole-image fallback (area fraction 1 > 0.4) cannot be a regular sample here
    regular = ~((h == height) & (w == width))
    assert regular.mean() > 0.99
    h, w = h[regular], w[regular]
    # w = round(sqrt(T r)), h = round(sqrt(T / r)), so (w - .5)(h - .5) <= T <= (w + .5)(h + .5)
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * area).all()
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * area).all()
    frac = h * w / area
    assert frac.min() < 0.07 and frac.max() > 0.37  # the range is covered
    ratio = w / h
    assert (ratio > 3 / 4 - 0.02).all() and (ratio < 4 / 3 + 0.02).all()


# ------------------------------------------------------------------ PIL MultiCropTransform


def small_data_cfg(local_crops: int = N_LOCAL) -> DataConfig:
    return DataConfig(
        global_size=28, local_size=12, local_crops=local_crops, blur_sigma=[0.1, 0.6],
        global_scale=[0.4, 1.0], local_scale=[0.1, 0.4],
    )  # fmt: skip


def pil_image(size=(40, 32), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr if channels == 3 else arr[..., 0], mode)


def test_pil_multicrop_views() -> None:
    t = MultiCropTransform(small_data_cfg())
    views = t(pil_image())
    assert len(views) == 2 + N_LOCAL
    for v in views[:2]:
        assert v.shape == (3, 28, 28) and v.dtype == torch.float32
    for v in views[2:]:
        assert v.shape == (3, 12, 12) and v.dtype == torch.float32
    for v in views:
        raw = unnormalize(v[None])
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_pil_multicrop_seeded_is_reproducible() -> None:
    t = MultiCropTransform(small_data_cfg())
    img = pil_image()
    torch.manual_seed(5)
    a = t(img)
    torch.manual_seed(5)
    b = t(img)
    torch.manual_seed(6)
    c = t(img)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert any(not torch.allclose(x, z) for x, z in zip(a, c, strict=True))


def test_pil_multicrop_no_local() -> None:
    assert len(MultiCropTransform(small_data_cfg(0))(pil_image())) == 2


# ------------------------------------------------------------------ seeding


def test_uniforms_range_and_moments() -> None:
    u = uniforms(sample_keys(0, 0, np.arange(500)), 20)
    assert u.shape == (500, 20)
    assert u.dtype == np.float64
    assert (u >= 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < 0.01
    assert abs(u.var() - 1 / 12) < 0.005
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert (abs(hist / u.size - 0.1) < 0.01).all()
    # columns (counters) are not correlated with each other
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.15


def test_uniforms_differ_across_streams_indices_epochs_seeds() -> None:
    idx = np.arange(50)
    base = uniforms(sample_keys(0, 0, idx, stream=0), 8)
    for other in (
        uniforms(sample_keys(0, 0, idx, stream=1), 8),
        uniforms(sample_keys(0, 1, idx, stream=0), 8),
        uniforms(sample_keys(1, 0, idx, stream=0), 8),
    ):
        assert not np.isclose(base, other).any()
    assert len({tuple(r) for r in base}) == 50  # every index its own numbers
    np.testing.assert_array_equal(base, uniforms(sample_keys(0, 0, idx, stream=0), 8))


def test_sample_keys_elementwise() -> None:
    batch = sample_keys(7, 3, np.array([3, 5, 7]), stream=2)
    alone = sample_keys(7, 3, np.array([5]), stream=2)
    assert batch[1] == alone[0]
    s = sample_seed(7, 3, 5)
    assert 0 <= s < 2**63
    assert s != sample_seed(7, 4, 5) and s != sample_seed(7, 3, 6)
