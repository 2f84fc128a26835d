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


#: Side of :func:`coordinate_images`: one uint8 value per pixel column and row.
COORD = 256


def coordinate_images(n: int) -> torch.Tensor:
    """``n`` copies of a ``COORD``-pixel image whose red value is the pixel's column and green
    value its row: a view of it shows the box it was cropped from."""
    ramp = torch.arange(COORD, dtype=torch.uint8)
    img = torch.stack([ramp.expand(COORD, COORD), ramp[:, None].expand(COORD, COORD)])
    return torch.cat([img, torch.zeros(1, COORD, COORD, dtype=torch.uint8)])[None].repeat(
        n, 1, 1, 1
    )


def drawn_crops(view: torch.Tensor) -> dict[str, np.ndarray]:
    """The crop box behind each view of :func:`coordinate_images` (normalized with mean 0 and
    std 1, no color operation): area as a fraction of the image, aspect ratio, edges and flip.

    Output pixels 2 and ``S - 3`` of a view downscaled by ``f >= 1`` have centers ``2.5 f - 0.5``
    input pixels inside the box and a bicubic support of ``2 f``: their kernels stay inside the
    box, so they are the ramp's values there and the box's width is ``S / (S - 5)`` times their
    difference (within the 1-value rounding to uint8)."""
    px = view.double() * 255
    s = view.shape[-1]
    mid = s // 2
    dx = px[:, 0, mid, s - 3] - px[:, 0, mid, 2]
    dy = px[:, 1, s - 3, mid] - px[:, 1, 2, mid]
    w, h = dx.abs() * s / (s - 5), dy * s / (s - 5)
    left = torch.minimum(px[:, 0, mid, 2], px[:, 0, mid, s - 3]) - (2.5 * w / s - 0.5)
    top = px[:, 1, 2, mid] - (2.5 * h / s - 0.5)
    out = {"area": w * h / COORD**2, "ratio": w / h, "left": left, "top": top}
    out |= {"right": left + w, "bottom": top + h, "flipped": dx < 0}
    return {k: v.numpy() for k, v in out.items()}


def assert_crops_drawn_from(view: torch.Tensor, size: int, scale: tuple[float, float]) -> None:
    """The views are ``size``-pixel crops whose areas lie in ``scale`` and cover it, with
    RandomResizedCrop's ratios, inside the image, mirrored half of the time."""
    assert view.shape[1:] == (3, size, size)
    c = drawn_crops(view)
    lo, hi = scale
    assert (c["area"] > 0.93 * lo).all() and (c["area"] < 1.07 * hi).all(), c["area"]
    assert c["area"].min() < lo + 0.15 * (hi - lo) and c["area"].max() > hi - 0.15 * (hi - lo)
    assert (c["ratio"] > 0.95 * 3 / 4).all() and (c["ratio"] < 1.05 * 4 / 3).all()
    assert (c["left"] > -1.5).all() and (c["top"] > -1.5).all()
    assert (c["right"] < COORD + 1.5).all() and (c["bottom"] < COORD + 1.5).all()
    se = math.sqrt(0.25 / len(view))
    assert abs(c["flipped"].mean() - 0.5) < 4 * se


def no_color_ops(views: list[ViewSpec], blur_sigma=(0.1, 2.0)) -> TensorMultiCrop:
    return TensorMultiCrop(views, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, blur_sigma, (0.0,) * 3, (1.0,) * 3)


@pytest.mark.parametrize("n_local", [0, 3])
def test_tensor_views_are_crops_drawn_in_their_scale_range(n_local: int) -> None:
    """Two global views from the global scale range, then the local views from theirs (none
    when there are no local crops): the boxes measured on the pixels of each view."""
    specs = [ViewSpec(64, (0.4, 1.0), 0.0, 0.0)] * 2 + [
        ViewSpec(32, (0.05, 0.4), 0.0, 0.0)
    ] * n_local
    n = 128
    views = no_color_ops(specs)(coordinate_images(n), np.arange(n), epoch=0, seed=0)
    assert len(views) == 2 + n_local
    for v, spec in zip(views, specs, strict=True):
        assert_crops_drawn_from(v, spec.size, spec.scale)
    # each view draws its own box
    areas = [drawn_crops(v)["area"] for v in views]
    assert not np.allclose(areas[0], areas[1], atol=0.02)


def checker_images(n: int, size: int = 16) -> torch.Tensor:
    """Red: a one-pixel checkerboard of 0 and 96 (a blur flattens it; never solarized),
    green: 200 everywhere (solarized to 55; a blur keeps it), blue: 50."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    red = ((yy + xx) % 2 * 96).to(torch.uint8)
    img = torch.stack([red, torch.full_like(red, 200), torch.full_like(red, 50)])
    return img[None].repeat(n, 1, 1, 1)


def blurred_and_solarized(view: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per view of :func:`checker_images` (mean 0, std 1): blurred (the checkerboard's contrast
    below half, away from the borders) and solarized (green inverted)."""
    px = view.double() * 255
    inner = px[:, :, 4:-4, 4:-4]
    blurred = inner[:, 0].std((1, 2)) < 24.0  # 48 unblurred; < 1 after a sigma >= 1 blur
    solarized = (inner[:, 1] - 55).abs().amax((1, 2)) < 1.0
    assert ((inner[:, 1] - 200).abs().amax((1, 2)) < 1.0).logical_xor(solarized).all()
    return blurred.numpy(), solarized.numpy()


def assert_probabilities(view: torch.Tensor, blur_p: float, solarize_p: float) -> None:
    blurred, solarized = blurred_and_solarized(view)
    for seen, p in ((blurred, blur_p), (solarized, solarize_p)):
        se = math.sqrt(p * (1 - p) / len(seen))
        assert abs(seen.mean() - p) <= 4 * se, (seen.mean(), p)


def test_tensor_blur_and_solarize_probabilities_per_view() -> None:
    """The recipe's per-view probabilities: blur 1.0 / 0.1 / 0.5 (global 1, global 2, locals),
    solarization 0 / 0.2 / 0, counted on 1000 samples (within 4 standard errors)."""
    probs = [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0), (0.5, 0.0)]
    aug = no_color_ops([ViewSpec(16, (1.0, 1.0), b, s) for b, s in probs], blur_sigma=(1.0, 2.0))
    n = 1000
    views = aug(checker_images(n), np.arange(n), epoch=0, seed=0)
    for v, (blur_p, solarize_p) in zip(views, probs, strict=True):
        assert_probabilities(v, blur_p, solarize_p)


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


def plain_cfg(**kw) -> DataConfig:
    """Views with no color operation and a normalization that keeps the pixel values."""
    base = dict(
        brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, color_jitter_p=0.0,
        grayscale_p=0.0, blur_p=[0.0, 0.0, 0.0], solarize_p=[0.0, 0.0, 0.0],
        mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0],
    )  # fmt: skip
    return DataConfig(**(base | kw))


def pil_views(t: MultiCropTransform, img: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The views of ``n`` calls of ``t`` on ``img`` (uint8 [3, H, W]), stacked per view."""
    pil = Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB")
    calls = [t(pil) for _ in range(n)]
    return [torch.stack(views) for views in zip(*calls, strict=True)]


@pytest.mark.parametrize("local_crops", [0, 2])
def test_pil_views_are_crops_drawn_in_their_scale_range(local_crops: int) -> None:
    cfg = plain_cfg(global_size=64, local_size=32, local_crops=local_crops,
                    global_scale=[0.4, 1.0], local_scale=[0.05, 0.4])  # fmt: skip
    views = pil_views(MultiCropTransform(cfg), coordinate_images(1)[0], 128)
    assert len(views) == 2 + local_crops
    for i, v in enumerate(views):
        size, scale = (64, (0.4, 1.0)) if i < 2 else (32, (0.05, 0.4))
        assert_crops_drawn_from(v, size, scale)


def test_pil_blur_and_solarize_probabilities_per_view() -> None:
    """The PIL path's per-view probabilities, as the tensor path's (400 calls)."""
    cfg = plain_cfg(global_size=16, local_size=16, local_crops=1, global_scale=[1.0, 1.0],
                    local_scale=[1.0, 1.0], blur_sigma=[1.0, 2.0], blur_p=[1.0, 0.1, 0.5],
                    solarize_p=[0.0, 0.2, 0.0])  # fmt: skip
    views = pil_views(MultiCropTransform(cfg), checker_images(1)[0], 400)
    probs = [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)]
    for v, (blur_p, solarize_p) in zip(views, probs, strict=True):
        assert_probabilities(v, blur_p, solarize_p)


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
