"""The batched tensor path's building blocks against torchvision (what the PIL path runs): the
separable antialiased bicubic crop + resize + flip (matrix products, and the per-row ``uint8``
resize used on CPUs), the in-place hue rotation, the per-row Gaussian blur, and whole views
replayed step by step with ``torchvision.transforms.v2.functional``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dino.data import tensor_aug
from dino.data.crop_draws import ViewSpec, crop_boxes, resize_weights
from dino.data.photometric import adjust_hue, adjust_hue_, blur_, blur_kernels, blur_radii
from dino.data.seeding import sample_keys, uniforms
from dino.data.tensor_aug import TensorMultiCrop

BICUBIC = InterpolationMode.BICUBIC
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: The two resize paths: matrix products (other devices, small images) and per-row uint8 calls
#: (CPUs); the threshold is patched to pick one.
PATHS = {"dense": 1 << 62, "uint8": -1}


def smooth_image(channels: int, height: int, width: int) -> torch.Tensor:
    """A smooth float picture in [0, 1]: sums of low-frequency sines."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    chans = [
        0.5 + 0.25 * torch.sin(xx / (5 + 2 * c) + c) + 0.2 * torch.cos(yy / (7 + c) - 2 * c)
        for c in range(channels)
    ]
    return torch.stack(chans).float()


def random_images(n: int, channels: int, height: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, channels, height, width), generator=g, dtype=torch.uint8)


BOXES = [  # (top, left, h, w): shrinking, enlarging, the whole image, thin, at the far corner
    (3, 5, 30, 41),
    (10, 2, 7, 9),
    (0, 0, 40, 52),
    (4, 20, 33, 6),
    (25, 37, 15, 15),
]


@pytest.mark.parametrize("size", [12, 16, 40])
def test_resize_weights_match_torchvision_resized_crop(size: int) -> None:
    img = smooth_image(3, 40, 52)
    top, left, h, w = np.array(BOXES, dtype=np.float64).T
    ry = torch.from_numpy(resize_weights(top, h, size, 40))
    rx = torch.from_numpy(resize_weights(left, w, size, 52))
    ours = ry[:, None] @ img @ rx[:, None].transpose(-1, -2)
    for i, (t, lft, hh, ww) in enumerate(BOXES):
        ref = TF.resized_crop(img, t, lft, hh, ww, [size, size], BICUBIC, antialias=True)
        torch.testing.assert_close(ours[i], ref, atol=2e-5, rtol=0)
        # rows are normalized and touch only the crop
        torch.testing.assert_close(ry[i].sum(1), torch.ones(size), atol=1e-6, rtol=0)
        assert ry[i, :, :t].abs().sum() == 0 and ry[i, :, t + hh :].abs().sum() == 0
        assert rx[i, :, :lft].abs().sum() == 0 and rx[i, :, lft + ww :].abs().sum() == 0


def view_draws(aug: TensorMultiCrop, indices: np.ndarray, epoch: int, seed: int, view: int):
    """Per-row uniforms of one view, as ``TensorMultiCrop`` draws them: 40 for the crop box,
    then 14 for flip, jitter (apply, 4 factors, 4 for the order), grayscale, blur (apply,
    sigma), solarization."""
    u = uniforms(sample_keys(seed, epoch, indices, stream=view), 4 * 10 + 14)
    return u[:, :40], u[:, 40:]


def reference_crop(img: torch.Tensor, box, size: int, path: str) -> torch.Tensor:
    """What the resize path computes for one image, in [0, 1]: torchvision's resized_crop on
    ``uint8`` (the PIL path's kernel), or on floats (the matrix path)."""
    t, lft, hh, ww = (int(v) for v in box)
    if path == "uint8":
        out = TF.resized_crop(img, t, lft, hh, ww, [size, size], BICUBIC, antialias=True).float()
    else:
        out = TF.resized_crop(img.float(), t, lft, hh, ww, [size, size], BICUBIC, antialias=True)
        out = out.clamp(0, 255)
    return out / 255


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("channels", [1, 3])
def test_crop_resize_flip_match_torchvision(monkeypatch, path: str, channels: int) -> None:
    monkeypatch.setattr(tensor_aug, "_DENSE_RESIZE_MACS", PATHS[path])
    specs = [ViewSpec(20, (0.3, 1.0), 0.0, 0.0), ViewSpec(9, (0.05, 0.4), 0.0, 0.0)]
    aug = TensorMultiCrop(specs, 0.4, 0.4, 0.2, 0.1, 0.0, 0.0, (0.1, 2.0), (0, 0, 0), (1, 1, 1))
    data = (smooth_image(channels, 37, 45) * 255).round().to(torch.uint8)
    data = torch.stack([data, data.flip(-2), data.flip(-1), 255 - data] * 4)
    idx = np.arange(len(data)) + 100
    views = aug(data, idx, epoch=3, seed=5)
    flips = []
    for v, spec in enumerate(specs):
        u_box, d = view_draws(aug, idx, 3, 5, v)
        boxes = crop_boxes(u_box, 37, 45, spec.scale)
        for i in range(len(data)):
            ref = reference_crop(data[i], boxes[i], spec.size, path)
            if d[i, 0] < 0.5:
                ref = ref.flip(-1)
            flips.append(d[i, 0] < 0.5)
            atol = 1e-6 if path == "uint8" else 1e-5
            torch.testing.assert_close(views[v][i], ref.expand(3, -1, -1), atol=atol, rtol=0)
    assert 0 < np.mean(flips) < 1  # both cases were checked


def test_uint8_and_dense_paths_agree_within_rounding(monkeypatch) -> None:
    specs = [ViewSpec(24, (0.3, 1.0), 0.0, 0.0), ViewSpec(10, (0.05, 0.4), 0.0, 0.0)]
    aug = TensorMultiCrop(specs, 0.4, 0.4, 0.2, 0.1, 0.0, 0.0, (0.1, 2.0), (0, 0, 0), (1, 1, 1))
    data = (smooth_image(3, 48, 64) * 255).round().to(torch.uint8)[None].repeat(6, 1, 1, 1)
    out = {}
    for path, macs in PATHS.items():
        monkeypatch.setattr(tensor_aug, "_DENSE_RESIZE_MACS", macs)
        out[path] = aug(data, np.arange(6), epoch=0, seed=0)
    for a, b in zip(out["uint8"], out["dense"], strict=True):
        # the uint8 kernel rounds after each of its two passes (and its weights to fixed point)
        assert (a - b).abs().max() <= 1.5 / 255
        assert (a - b).abs().mean() <= 0.5 / 255


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("channels", [1, 3])
def test_views_independent_of_batch_both_paths(monkeypatch, path: str, channels: int) -> None:
    monkeypatch.setattr(tensor_aug, "_DENSE_RESIZE_MACS", PATHS[path])
    views = [ViewSpec(20, (0.4, 1.0), 1.0, 0.0), ViewSpec(20, (0.4, 1.0), 0.1, 0.2)]
    views += [ViewSpec(8, (0.05, 0.4), 0.5, 0.0)] * 3
    aug = TensorMultiCrop(views, 0.4, 0.4, 0.2, 0.1, 0.8, 0.2, (0.1, 2.0), MEAN, STD)
    data = random_images(24, channels, 30, 34)
    batch = np.array([3, 5, 7, 11, 13, 17, 19, 23])
    many = aug(data[batch], batch, epoch=2, seed=11)
    alone = aug(data[[7]], np.array([7]), epoch=2, seed=11)
    for v_many, v_alone in zip(many, alone, strict=True):
        torch.testing.assert_close(v_many[2:3], v_alone, atol=1e-5, rtol=0)


def test_hue_in_place_matches_the_hsv_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 17, 19, generator=g)
    x[0, :, :3] = 0.4  # gray pixels
    x[1, 0, :3] = x[1, 1, :3]  # red = green (ties for the max channel)
    x[2, 1, :3] = x[2, 2, :3]  # green = blue
    x[3, :, :2] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red (hue at the seam)
    x[4] = (x[4] * 255).round() / 255  # values on the uint8 grid
    shift = torch.tensor([0.5, -0.5, 0.1, -0.1, 0.0, 0.3333])
    ref = adjust_hue(x, shift) * 255
    ours = x * 255
    bufs = [torch.empty(6, 17, 19) for _ in range(6)]
    adjust_hue_(ours, shift, bufs)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)  # pixel units (0..255)


@pytest.mark.parametrize(("size", "kernel"), [(24, 13), (12, 11), (5, 5)])
def test_blur_matches_torchvision_gaussian_blur(size: int, kernel: int) -> None:
    x = torch.rand(7, 3, size, size, generator=torch.Generator().manual_seed(2)) * 255
    rows = np.array([0, 2, 3, 6])
    sigma = np.array([0.1, 0.7, 1.3, 2.0])
    radius = (kernel - 1) // 2
    ours = x.clone()
    blur_(ours, rows, sigma, radius)
    for i in range(7):
        if i in rows:
            s = float(sigma[list(rows).index(i)])
            ref = TF.gaussian_blur(x[i], [kernel, kernel], [s, s])
        else:
            ref = x[i]
        torch.testing.assert_close(ours[i], ref, atol=1e-3, rtol=1e-5)


def test_shorter_blur_kernels_leave_out_only_negligible_taps() -> None:
    """Each row's kernel is cut to the taps that matter: the small sigmas' are short (sigma 0.1:
    one tap, the identity), and the taps left out weigh less than 1e-6 of the recipe's kernel."""
    sigma = np.linspace(0.1, 2.0, 39)
    radii = blur_radii(sigma, 6)
    assert radii[0] == 0 and radii[-1] == 6 and np.all(np.diff(radii) >= 0)
    assert (2 * radii + 1).mean() < 10  # of 13 taps
    full = blur_kernels(sigma, 6)
    for s, r, k in zip(sigma, radii, full, strict=True):
        short = np.zeros(13, np.float32)
        short[6 - r : 7 + r] = blur_kernels(np.array([s]), int(r))[0]
        assert np.abs(short - k).sum() < 1e-6


def replay(
    img: torch.Tensor,
    box: np.ndarray,
    d: np.ndarray,
    spec: ViewSpec,
    cfg: dict,
    path: str,
) -> torch.Tensor:
    """One view computed step by step with torchvision's functional ops, in the PIL path's
    order (multicrop.view_transform), from the row's uniforms ``d``."""
    x = reference_crop(img, box, spec.size, path)
    if d[0] < 0.5:
        x = TF.horizontal_flip(x)
    if d[1] < cfg["color_jitter_p"]:
        factors = []
        for i, strength in enumerate([cfg["brightness"], cfg["contrast"], cfg["saturation"]]):
            lo = max(0.0, 1 - strength)  # torchvision's range [max(0, 1 - s), 1 + s]
            factors.append(lo + (1 + strength - lo) * d[2 + i])
        b, c, s = factors
        h = cfg["hue"] * (2 * d[5] - 1)
        for op in np.argsort(d[6:10]):
            if op == 0:
                x = TF.adjust_brightness(x, b)
            elif op == 1:
                x = TF.adjust_contrast(x, c)
            elif op == 2:
                x = TF.adjust_saturation(x, s)
            else:
                x = TF.adjust_hue(x, h)
    if d[10] < cfg["grayscale_p"] and x.shape[0] == 3:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if d[11] < spec.blur_p:
        lo, hi = cfg["blur_sigma"]
        kernel = min(2 * math.ceil(3 * hi) + 1, spec.size - (1 - spec.size % 2))
        sigma = lo + (hi - lo) * d[12]
        x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    if d[13] < spec.solarize_p:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x.expand(3, -1, -1), list(MEAN), list(STD))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("channels", [1, 3])
def test_views_match_a_step_by_step_torchvision_replay(
    monkeypatch, path: str, channels: int
) -> None:
    """Every operation, its parameters, probabilities and the per-row jitter order, against
    torchvision's functional ops applied one view at a time (float, so no uint8 rounding
    between the steps; grayscale weights 0.299 vs torchvision's 0.2989)."""
    monkeypatch.setattr(tensor_aug, "_DENSE_RESIZE_MACS", PATHS[path])
    cfg = dict(
        brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, color_jitter_p=0.8,
        grayscale_p=0.2, blur_sigma=(0.1, 2.0),
    )  # fmt: skip
    specs = [ViewSpec(24, (0.4, 1.0), 1.0, 0.0), ViewSpec(24, (0.4, 1.0), 0.1, 0.5)]
    specs += [ViewSpec(12, (0.05, 0.4), 0.5, 0.0)] * 3
    aug = TensorMultiCrop(specs, **cfg, mean=MEAN, std=STD)
    data = random_images(16, channels, 36, 44)
    data = torch.stack([TF.gaussian_blur(im, [5, 5], [1.5, 1.5]) for im in data])  # less noisy
    idx = np.arange(16) * 7
    views = aug(data, idx, epoch=1, seed=3)
    seen = np.zeros(5, dtype=bool)  # jitter with hue after saturation, gray, blur, solarize, flip
    for v, spec in enumerate(specs):
        u_box, d = view_draws(aug, idx, 1, 3, v)
        boxes = crop_boxes(u_box, 36, 44, spec.scale)
        for i in range(16):
            ref = replay(data[i], boxes[i], d[i], spec, cfg, path)
            torch.testing.assert_close(views[v][i], ref, atol=2e-3, rtol=0)
        order = np.argsort(d[:, 6:10], axis=1)
        hue_late = (d[:, 1] < 0.8) & (np.argmax(order == 3, 1) > np.argmax(order == 2, 1))
        seen |= [hue_late.any(), (d[:, 10] < 0.2).any(), (d[:, 11] < spec.blur_p).any(),
                 (d[:, 13] < spec.solarize_p).any(), (d[:, 0] < 0.5).any()]  # fmt: skip
    assert seen.all()
