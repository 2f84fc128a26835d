"""Folders of photos through the batched augmentation, and folders of many files.

* the crops made per image (``FileCrops``, in DataLoader workers) followed by the batched
  photometric half (``TensorMultiCrop.from_crops``) give exactly the views of the in-memory path
  on the same pixels, whatever the batch;
* JPEGs decoded at a reduced size (``draft``) when the crops allow it, huge ones within
  ``Image.MAX_IMAGE_PIXELS``; odd and broken files;
* the compact file list, its cache beside the folder and the cache's invalidation.

Test images are cut from scikit-image's photographs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from dino.config_load import load_config
from dino.data import file_index, tensor_aug
from dino.data.crop_draws import ViewSpec
from dino.data.datasets import (
    IMAGE_EXTENSIONS,
    BadImage,
    ImageFiles,
    TensorImages,
    decode_bad,
    jpeg_reduction,
    load_image,
    open_training_data,
    opened_image,
    scan_folder,
    to_rgb,
)
from dino.data.file_crops import CropFiles, FileCrops
from dino.data.file_index import FileList, cache_path, index_folder
from dino.data.tensor_aug import TensorMultiCrop
from dino.errors import DinoError
from dino.training.batches import Batches
from dino.training.distributed import Dist

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
JITTER = dict(
    brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, color_jitter_p=0.8, grayscale_p=0.2,
    blur_sigma=(0.1, 2.0), mean=MEAN, std=STD,
)  # fmt: skip
VIEWS = [ViewSpec(24, (0.4, 1.0), 1.0, 0.0), ViewSpec(24, (0.4, 1.0), 0.1, 0.2)]
VIEWS += [ViewSpec(12, (0.05, 0.4), 0.5, 0.0)] * 3


def photos() -> list[np.ndarray]:
    import skimage.data as sk

    return [sk.astronaut(), sk.coffee(), sk.chelsea(), sk.rocket(), sk.immunohistochemistry()]


def photo(i: int, size: tuple[int, int]) -> Image.Image:
    """Picture ``i``: a random crop of one of scikit-image's photographs, resized to ``size``."""
    pics = photos()
    p = pics[i % len(pics)]
    rng = np.random.default_rng(i)
    h, w = p.shape[0] * 3 // 4, p.shape[1] * 3 // 4
    y, x = rng.integers(0, p.shape[0] - h), rng.integers(0, p.shape[1] - w)
    return Image.fromarray(p[y : y + h, x : x + w]).resize(size, Image.BICUBIC)


def write_photos(root: Path, n: int, size: tuple[int, int], ext: str = "png") -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{i:03d}.{ext}" for i in range(n)]
    for i, p in enumerate(paths):
        photo(i, size).save(p)
    return paths


def collate_crops(ds: CropFiles, keys: list[tuple[int, int]]):
    """What a DataLoader hands the training process for a batch of ``keys``."""
    return default_collate([ds[k] for k in keys])


# ------------------------------------------------------------------ crops in workers


def test_folder_crops_then_batched_photometric_equal_the_in_memory_views(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(tensor_aug, "_DENSE_RESIZE_MACS", -1)  # torch's uint8 resize, as workers
    paths = write_photos(tmp_path / "img", 8, (60, 45))
    images = torch.stack(
        [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths]
    )
    aug = TensorMultiCrop(VIEWS, **JITTER)
    ds = CropFiles(ImageFiles(tmp_path / "img"), FileCrops(VIEWS, seed=9))
    for epoch, idx in [(0, np.array([3, 1, 7, 0, 5])), (2, np.array([6])), (2, np.arange(8))]:
        expected = aug(images[idx], idx, epoch, seed=9)
        crops, labels, bad, index = collate_crops(ds, [(epoch, int(i)) for i in idx])
        assert index.tolist() == idx.tolist() and list(bad) == [""] * len(idx)
        n = len(idx)
        assert [tuple(c.shape) for c in crops] == [(n, 2, 3, 24, 24), (n, 3, 3, 12, 12)]
        views = aug.from_crops(list(crops), index.numpy(), epoch, seed=9)
        for v, e in zip(views, expected, strict=True):
            assert torch.equal(v, e)
    other_seed = FileCrops(VIEWS, seed=10)(str(paths[0]), 0, 0)
    assert not torch.equal(other_seed[0], FileCrops(VIEWS, seed=9)(str(paths[0]), 0, 0)[0])


def test_jpeg_decoded_smaller_only_when_every_crop_allows_it(tmp_path) -> None:
    path = tmp_path / "big.jpg"
    photo(1, (1600, 1200)).save(path, quality=95)
    with opened_image(path) as im:
        assert [jpeg_reduction(im, a) for a in (0.5, 1.0, 1.9, 2.0, 3.9, 4.5, 100.0)] == [
            1, 1, 1, 2, 2, 4, 8,
        ]  # fmt: skip
        assert to_rgb(im, 5.0).size == (400, 300)
    png = tmp_path / "big.png"
    photo(1, (800, 600)).save(png)
    with opened_image(png) as im:
        assert jpeg_reduction(im, 8.0) == 1  # other formats are decoded whole

    # large crops of a large photo: decoded at 1/s; the views stay close to a full decode
    views = [ViewSpec(64, (0.5, 1.0), 0.0, 0.0), ViewSpec(32, (0.3, 0.5), 0.0, 0.0)]
    crops = FileCrops(views, seed=0)
    full = FileCrops(views, seed=0)
    reductions, diffs = [], []
    for index in range(12):
        boxes = crops.boxes(0, index, 1200, 1600)
        allowed = np.min(np.minimum(boxes[:, 2], boxes[:, 3]) / np.array([64, 32]))
        reductions.append(min(8, 2 ** int(np.log2(allowed))))
        reduced = crops(str(path), 0, index)
        with opened_image(path) as im:
            pixels = torch.from_numpy(np.array(to_rgb(im))).permute(2, 0, 1)[None]
        for group, out in zip(full.groups, reduced, strict=True):
            for j, v in enumerate(group):
                t, lft, h, w = boxes[v].astype(int)
                ref = torch.nn.functional.interpolate(
                    pixels[..., t : t + h, lft : lft + w].float(),
                    size=(views[v].size,) * 2,
                    mode="bicubic",
                    antialias=True,
                )[0]
                ref = ref.flip(-1) if crops.flips(0, index)[v] else ref  # flipped by the worker
                diffs.append((out[j].float() - ref.clamp(0, 255)).abs().mean().item())
    assert max(reductions) >= 4  # the draws did reduce
    assert np.mean(diffs) < 3.0 and max(diffs) < 6.0  # of 255: resampling differences only


# ------------------------------------------------------------------ odd and broken files


def write_odd_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(readable, unreadable): every mode training converts, a 10 000 x 10 000 JPEG, images
    smaller than a crop, and broken files of every kind."""
    root.mkdir(parents=True)
    rgb = photo(0, (40, 30))
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257).save(root / "gray16.png")
    rgb.quantize(16).save(root / "palette_transparent.png", transparency=0)
    rgb.convert("RGBA").save(root / "rgba.png")
    rgb.convert("L").save(root / "gray.jpg")
    rgb.resize((3, 2)).save(root / "tiny.png")
    rgb.resize((1, 1)).save(root / "one_pixel.png")
    Image.new("RGB", (10_000, 10_000), (120, 60, 200)).save(root / "huge.jpg", quality=50)
    for i in range(4):
        photo(i, (40, 30)).save(root / f"plain{i}.jpg")
    jpg = (root / "plain0.jpg").read_bytes()
    png = (root / "rgba.png").read_bytes()
    bad = {
        "zero_bytes.jpg": b"",
        "truncated.jpg": jpg[: len(jpg) // 3],
        "truncated.png": png[: len(png) // 2],
        "corrupt.jpg": jpg[:200] + bytes(range(256)) * 4,
        "not_an_image.png": b"name,size\nshirt,3\n",
    }
    for name, content in bad.items():
        (root / name).write_bytes(content)
    unreadable = sorted(root / name for name in bad)
    readable = sorted(p for p in root.iterdir() if p not in unreadable)
    return readable, unreadable


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("odd") / "images"
    readable, unreadable = write_odd_files(root)
    return root, readable, unreadable


def test_odd_files_give_crops_or_bad_image(odd) -> None:
    _, readable, unreadable = odd
    crops = FileCrops(VIEWS, seed=0)
    for path in readable:
        out = crops(str(path), 0, 1)
        assert [tuple(c.shape) for c in out] == [(2, 3, 24, 24), (3, 3, 12, 12)], path
        assert all(c.dtype == torch.uint8 for c in out)
    huge = next(p for p in readable if p.name == "huge.jpg")
    out = crops(str(huge), 0, 1)
    assert (out[0].float() - torch.tensor([120, 60, 200]).view(3, 1, 1)).abs().max() <= 3
    with opened_image(huge) as im:  # a full decode stays within PIL's pixel limit
        assert to_rgb(im).size == (5000, 5000)
    for path in unreadable:
        with pytest.raises(BadImage, match=str(path)):
            crops(str(path), 0, 1)
        with pytest.raises(BadImage):
            load_image(path)


def test_bad_files_are_replaced_and_reported_by_workers(odd) -> None:
    root, readable, unreadable = odd
    ds = CropFiles(ImageFiles(root), FileCrops(VIEWS, seed=0))
    keys = [(0, i) for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=[keys[k : k + 4] for k in range(0, len(keys), 4)], num_workers=2
    )
    reported, seen = set(), 0
    for crops, _labels, bad, index in loader:
        assert crops[0].shape[1:] == (2, 3, 24, 24) and crops[0].shape[0] == len(index)
        reported |= {p for p, _ in decode_bad(bad)}
        seen += len(index)
    assert seen == len(readable) + len(unreadable)
    assert reported == {str(p) for p in unreadable}


# ------------------------------------------------------------------ the file list and its cache


def test_file_list_is_a_compact_sequence(tmp_path) -> None:
    names = ["b/2.jpg", "a/1.png", "a/é.jpg", "c/sub/3.jpg"]
    fl = FileList.from_paths(tmp_path, names)
    assert len(fl) == 4 and list(fl) == [str(tmp_path / n) for n in names]
    assert fl[2] == str(tmp_path / "a/é.jpg") and fl[-1] == str(tmp_path / "c/sub/3.jpg")
    assert list(fl[1:3]) == [str(tmp_path / n) for n in names[1:3]]
    assert list(fl[1::2]) == [str(tmp_path / n) for n in names[1::2]]
    assert list(fl[::-1]) == [str(tmp_path / n) for n in names[::-1]]
    assert len(fl[4:]) == 0 and list(fl[4:]) == []
    with pytest.raises(IndexError):
        fl[4]
    assert fl.nbytes() == sum(len(n.encode()) for n in names) + 5 * 8
    absolute = FileList.from_paths(tmp_path, [str(tmp_path / n) for n in names])
    assert list(absolute) == list(fl)


def make_tree(root: Path) -> None:
    for cls, n in (("cat", 3), ("dog", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            (root / cls / f"{i}.jpg").write_bytes(b"x")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.jpg").write_bytes(b"x")
    (root / ".cache").mkdir()
    (root / ".cache" / "0.jpg").write_bytes(b"x")


def test_index_lists_labels_and_is_cached_beside_the_folder(tmp_path, monkeypatch) -> None:
    root = tmp_path / "data" / "photos"
    make_tree(root)
    index = index_folder(root, IMAGE_EXTENSIONS)
    assert [os.path.relpath(p, root) for p in index.files] == [
        "cat/0.jpg", "cat/1.jpg", "cat/2.jpg", "dog/0.jpg", "dog/1.jpg",
    ]  # fmt: skip
    assert index.labels.tolist() == [0, 0, 0, 1, 1] and index.classes == ["cat", "dog"]
    assert index.others == 1 and not index.from_cache
    assert cache_path(root) == tmp_path / "data" / ".photos.dino-index.npz"
    assert cache_path(root).exists()

    def no_listing(*args):
        raise AssertionError("the folder was listed again")

    with monkeypatch.context() as m:
        m.setattr(file_index, "_list", no_listing)
        again = index_folder(root, IMAGE_EXTENSIONS)
    assert again.from_cache and list(again.files) == list(index.files)
    assert again.labels.tolist() == index.labels.tolist() and again.others == 1

    # any change below the folder lists it again
    for change in (
        lambda: (root / "cat" / "3.jpg").write_bytes(b"x"),  # a new file in a class folder
        lambda: (root / "dog" / "0.jpg").rename(root / "dog" / "9.jpg"),  # a renamed file
        lambda: (root / "cat" / "1.jpg").unlink(),  # a removed file
        lambda: (root / "bird").mkdir(),  # a new class folder
        lambda: (root / "bird" / "0.jpg").write_bytes(b"x"),  # filled
    ):
        change()
        fresh = index_folder(root, IMAGE_EXTENSIONS)
        assert not fresh.from_cache
        assert sorted(fresh.files) == sorted(
            str(p)
            for p in root.rglob("*.jpg")
            if not any(s.startswith(".") for s in p.relative_to(root).parts)
        )
        assert index_folder(root, IMAGE_EXTENSIONS).from_cache
    assert index_folder(root, IMAGE_EXTENSIONS).classes == ["bird", "cat", "dog"]


def test_index_cache_falls_back_to_the_run_folder(tmp_path, monkeypatch) -> None:
    root = tmp_path / "ro" / "photos"
    make_tree(root)
    run = tmp_path / "run"
    monkeypatch.setattr(file_index.os, "access", lambda path, mode: False)  # a read-only parent
    where = cache_path(root, run)
    assert where is not None and where.parent == run and where.name.startswith("file-index-photos-")
    assert cache_path(root) is None
    files, labels, classes = scan_folder(root, run)
    assert where.exists() and not (tmp_path / "ro" / ".photos.dino-index.npz").exists()
    assert len(files) == 5 and index_folder(root, IMAGE_EXTENSIONS, run).from_cache
    assert not index_folder(root, IMAGE_EXTENSIONS).from_cache  # no place for a cache: listed


def test_a_corrupt_cache_is_ignored(tmp_path) -> None:
    root = tmp_path / "photos"
    make_tree(root)
    index_folder(root, IMAGE_EXTENSIONS)
    cache_path(root).write_bytes(b"garbage")
    index = index_folder(root, IMAGE_EXTENSIONS)
    assert not index.from_cache and len(index.files) == 5
    assert index_folder(root, IMAGE_EXTENSIONS).from_cache  # rewritten


# ------------------------------------------------------------------ the training batches


def folder_batches(root: Path, augment: str = "auto", workers: int = 0, **overrides) -> Batches:
    """``dino train``'s batches for a folder (small views, batch 4, CPU)."""
    cfg = load_config(
        overrides={
            "data": str(root),
            "augment": augment,
            "num_workers": workers,
            "batch_size": 4,
            "global_size": 24,
            "local_size": 12,
            "local_crops": 3,
            "device": "cpu",
            "seed": 5,
            "patch_size": 4,
            **overrides,
        }  # fmt: skip
    )
    return Batches(cfg, open_training_data(str(root)).train, Dist(), torch.device("cpu"))


def all_views(b: Batches, epochs: int, start: int = 0) -> list[list[torch.Tensor]]:
    return [views for e in range(epochs) for views, _bad in b.epoch(e, start if e == 0 else 0)]


def test_folder_views_do_not_depend_on_workers_batch_or_resume(tmp_path, monkeypatch) -> None:
    root = tmp_path / "img"
    paths = write_photos(root, 12, (60, 45))
    b0 = folder_batches(root, workers=0)
    assert b0.mode == "tensor" and not b0.in_memory  # folders take the batched path by default
    ref = all_views(b0, 2)
    assert len(ref) == 2 * 3
    for views in ref:
        assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 3
        assert all(v.dtype == torch.float32 for v in views)
    for other in (all_views(folder_batches(root, workers=2), 2), all_views(b0, 2)):
        for a, b in zip(ref, other, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    resumed = all_views(folder_batches(root, workers=1), 1, start=1)  # steps 1, 2 of epoch 0
    for a, b in zip(ref[1:3], resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # the in-memory path on the same pixels gives the same views (torch's uint8 resize)
    monkeypatch.setattr(tensor_aug, "_DENSE_RESIZE_MACS", -1)
    pixels = [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths]
    memory = TensorImages(torch.stack(pixels), None, [], "photos")
    cfg = b0.cfg
    in_memory = Batches(cfg, memory, Dist(), torch.device("cpu"))
    assert in_memory.in_memory
    for a, b in zip(ref, all_views(in_memory, 2), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_pil_path_is_for_folders_only(tmp_path) -> None:
    memory = TensorImages(torch.zeros(8, 3, 20, 20, dtype=torch.uint8), None, [], "zeros")
    cfg = load_config(overrides={"augment": "pil", "batch_size": 4, "patch_size": 4})
    with pytest.raises(DinoError, match="--augment pil needs a folder"):
        Batches(cfg, memory, Dist(), torch.device("cpu"))
    root = tmp_path / "img"
    write_photos(root, 8, (40, 30))
    b = folder_batches(root, augment="pil")
    assert b.mode == "pil" and b.loader.dataset.transform is not None


# ------------------------------------------------------------------ same distributions as PIL


def same_distribution(a, b, what: str) -> None:
    """Two-sample Kolmogorov-Smirnov test at the 0.1 % level."""
    from scipy.stats import ks_2samp

    test = ks_2samp(np.asarray(a), np.asarray(b))
    assert test.pvalue > 1e-3, f"{what}: KS statistic {test.statistic:.3f}, p {test.pvalue:.1e}"


def pixels(view: torch.Tensor) -> torch.Tensor:
    """A normalized view back in pixel units."""
    return view * torch.tensor(STD).view(3, 1, 1) * 255 + torch.tensor(MEAN).view(3, 1, 1) * 255


def sampled_views(root: Path, epochs: int, **overrides) -> dict[str, list[list[torch.Tensor]]]:
    """Every view of ``epochs`` epochs from each path: ``{path: [per view index: [views]]}``."""
    out = {}
    for augment in ("auto", "pil"):
        b = folder_batches(root, augment=augment, **overrides)
        per_view: list[list[torch.Tensor]] = []
        for views in all_views(b, epochs):
            if not per_view:
                per_view = [[] for _ in views]
            for v, x in enumerate(views):
                per_view[v] += [pixels(row) for row in x]
        out[augment] = per_view
    return out


def test_crop_scales_and_aspect_ratios_match_the_pil_path(tmp_path) -> None:
    """Pictures whose red channel is x and green channel y: each view's first and last columns
    and rows give back the box it was cut from."""
    w, h = 200, 150
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx + 0.5) / w * 255, (yy + 0.5) / h * 255, np.full((h, w), 128.0)], -1)
    root = tmp_path / "xy"
    root.mkdir()
    for i in range(8):
        Image.fromarray(img.round().astype(np.uint8)).save(root / f"{i}.png")
    off = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": [0, 0, 0], "solarize_p": [0, 0, 0]}
    views = sampled_views(root, epochs=12, global_size=32, local_size=16, **off)
    stats = {}
    for path, per_view in views.items():
        for kind, vs in (("global", per_view[0] + per_view[1]), ("local", sum(per_view[2:], []))):
            size = vs[0].shape[-1]
            x = torch.stack([v[0, :, [0, -1]].mean(0) for v in vs]).numpy() / 255 * w
            y = torch.stack([v[1, [0, -1], :].mean(1) for v in vs]).numpy() / 255 * h
            bw = np.abs(x[:, 1] - x[:, 0]) * size / (size - 1)  # first/last pixel centers
            bh = np.abs(y[:, 1] - y[:, 0]) * size / (size - 1)
            stats[path, kind] = (bw * bh / (w * h), np.log(bw / bh))
    for kind, (lo, hi) in (("global", (0.4, 1.0)), ("local", (0.05, 0.4))):
        (s_ours, r_ours), (s_pil, r_pil) = stats["auto", kind], stats["pil", kind]
        assert len(s_ours) == len(s_pil) >= 192
        same_distribution(s_ours, s_pil, f"{kind} crop scale")
        same_distribution(r_ours, r_pil, f"{kind} crop log aspect ratio")
        # the recipe's ranges, within the measurement's resolution
        assert lo - 0.03 < np.quantile(s_ours, 0.02) and np.quantile(s_ours, 0.98) < hi + 0.05
        assert np.abs(r_ours).max() < np.log(4 / 3) + 0.1


def same_frequency(a: np.ndarray, b: np.ndarray, p: float, what: str) -> None:
    """Two samples of a yes/no event: their frequencies agree with each other and with ``p``
    (4 standard deviations)."""
    fa, fb = a.mean(), b.mean()
    sd = np.sqrt(max(p * (1 - p), 0.01) / len(a))
    assert abs(fa - fb) < 4 * np.sqrt(2) * sd and abs(fa - p) < 4 * sd, (what, fa, fb, p)


def gray_share(colors: np.ndarray) -> np.ndarray:
    """Views with equal channels among those jitter did not take to (near) white: the PIL path
    truncates to ``uint8`` after every operation, so its white often ends as 254 or 253."""
    colors = colors[colors.min(1) < 250]
    return np.ptp(colors, axis=1) < 0.5


@pytest.mark.slow
def test_color_jitter_grayscale_and_solarize_match_the_pil_path(tmp_path) -> None:
    """A plain, light picture: every crop is the same, so each view's color is its photometric
    operations' doing (jitter ranges and order, grayscale, solarization). Jitter keeps its
    brightest channel above 128 (each factor is at least 0.6), solarization takes all of them
    below."""
    root = tmp_path / "plain"
    root.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 30), (240, 220, 200)).save(root / f"{i}.png")
    views = sampled_views(root, epochs=40, global_size=8, local_size=4, blur_p=[0, 0, 0])
    colors = {  # in whole levels, as the PIL path rounds after each operation
        p: [torch.stack([x.mean((1, 2)) for x in xs]).numpy().round() for xs in per_view]
        for p, per_view in views.items()
    }
    assert len(colors["auto"][0]) == len(colors["pil"][0]) == 320
    for v, name in ((0, "global 1"), (1, "global 2 (solarized with p 0.2)"), (2, "local")):
        for c, channel in enumerate("RGB"):
            ours, pil = colors["auto"][v][:, c], colors["pil"][v][:, c]
            same_distribution(ours, pil, f"{name} {channel}")
    gray = {p: np.concatenate([gray_share(c) for c in cs]) for p, cs in colors.items()}
    same_frequency(gray["auto"], gray["pil"], 0.2, "grayscale")
    dark = {p: [c.max(1) < 128 for c in cs] for p, cs in colors.items()}
    same_frequency(dark["auto"][1], dark["pil"][1], 0.2, "solarization")
    assert not any(d[v].any() for d in dark.values() for v in (0, 2, 3, 4))  # p 0 elsewhere


@pytest.mark.slow
def test_blur_frequency_and_strength_match_the_pil_path(tmp_path) -> None:
    """Noise pictures of the global view's size, cropped (nearly) whole: the views'
    pixel-to-pixel differences shrink by how much each view was blurred."""
    root = tmp_path / "noise"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    off = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "solarize_p": [0, 0, 0]}
    views = sampled_views(root, epochs=24, global_size=32, local_size=16, global_scale=[1, 1],
                          local_scale=[1, 1], blur_sigma=[0.1, 2.0], **off)  # fmt: skip
    # the share of views blurred with sigma above 0.6 (an energy under 30 % of an unblurred
    # view's) is p (1.4 / 1.9) for sigma uniform in [0.1, 2]
    for v, (name, p) in enumerate((("global 1", 1.0), ("global 2", 0.1), ("local", 0.5))):
        energy = {
            path: np.array([(x[:, :, 1:] - x[:, :, :-1]).pow(2).mean().item() for x in pv[v]])
            for path, pv in views.items()
        }
        same_distribution(energy["auto"], energy["pil"], f"{name} blur")
        unblurred = np.quantile(energy["auto"], 0.95) if p < 1 else energy["auto"].max()
        strong = {k: e < 0.3 * unblurred for k, e in energy.items()}
        same_frequency(strong["auto"], strong["pil"], p * 1.4 / 1.9, f"{name} blur")


# ------------------------------------------------------------------ training on photos


def write_photo_splits(root: Path) -> None:
    """``train/`` (12 a class) and ``val/`` (4 a class): 3 classes, each cut from its own
    photograph (astronaut, coffee, rocket), JPEGs of 160 x 120."""
    for split, n, offset in (("train", 12, 0), ("val", 4, 500)):
        for c, picture in enumerate((0, 1, 3)):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                photo(picture + 5 * (offset + i), (160, 120)).save(folder / f"{i:02d}.jpg")


@pytest.mark.slow
def test_training_on_photos_with_knn_and_exact_resume(tmp_path, monkeypatch) -> None:
    """``dino train`` on a folder of photos with train/ and val/: the batched path, k-NN after
    each epoch, and a run stopped after step 3 and resumed ends with the uninterrupted run's
    weights, bit for bit (vit_tiny, 96 / 48 px crops, CPU fp32, 2 epochs of 4 steps)."""
    from helpers.faults import install_stop_before_step

    from dino.cli import main
    from dino.training.checkpoint import LATEST, load_checkpoint

    root = tmp_path / "photos"
    write_photo_splits(root)
    args = ["train", "--data", str(root), "--arch", "vit_tiny", "--global-size", "96",
            "--local-size", "48", "--local-crops", "2", "--out-dim", "256", "--batch-size", "9",
            "--epochs", "2", "--warmup-epochs", "0.5", "--precision", "fp32", "--device", "cpu",
            "--num-workers", "1", "--eval-every", "1", "--eval-resize", "96", "--eval-crop",
            "96", "--knn-k", "5", "--save-every", "2", "--log-every", "1"]  # fmt: skip
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--output-dir", str(ref)]) == 0
    results = json.loads((ref / "results.json").read_text())
    assert [h["epoch"] for h in results["knn_history"]] == [1, 2]
    assert results["knn"]["5"]["top1"] > 50  # 3 classes of very different pictures
    assert not (ref / "bad_files.txt").exists()
    assert (root / ".train.dino-index.npz").exists() and (root / ".val.dino-index.npz").exists()
    with monkeypatch.context() as m:
        install_stop_before_step(m, 3)
        with pytest.raises(SystemExit):
            main([*args, "--output-dir", str(run)])
    assert load_checkpoint(run)["iteration"] == 3
    assert main(["train", "--resume", str(run)]) == 0
    a, b = load_checkpoint(ref / LATEST), load_checkpoint(run / LATEST)
    assert a["iteration"] == b["iteration"] == 8
    for net in ("student", "teacher"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    assert a["knn_history"] == b["knn_history"]


def test_a_process_that_leaves_workers_running_still_exits(tmp_path) -> None:
    """A run that stops mid-epoch on an error leaves its persistent DataLoader workers alive;
    they ignore SIGTERM (signals to the process group are the training process's to handle),
    so the process must end them itself at exit instead of waiting for them forever."""
    import subprocess
    import sys

    root = tmp_path / "img"
    write_photos(root, 8, (40, 30))
    script = f"""
import torch
from dino.config_load import load_config
from dino.data.datasets import open_training_data
from dino.training.batches import Batches
from dino.training.distributed import Dist
cfg = load_config(overrides={{"data": {str(root)!r}, "global_size": 16, "local_size": 8,
                  "patch_size": 4, "batch_size": 4, "num_workers": 2, "device": "cpu"}})
batches = Batches(cfg, open_training_data(cfg.data.data).train, Dist(), torch.device("cpu"))
views, bad = next(batches.epoch(0))
print("batch", views[0].shape[0])
# ORPHAN
"""
    # the second case is the one a whole test session hit: the DataLoader and its iterator gone,
    # their workers never told to stop (an iterator whose shutdown was skipped)
    orphan = """
iterator = batches.loader._iterator
iterator._shutdown = True  # its finalizer now leaves the workers running
del batches, iterator
import gc; gc.collect()
import multiprocessing; assert multiprocessing.active_children()
"""
    for case in ("", orphan):
        proc = subprocess.run(
            [sys.executable, "-c", script.replace("# ORPHAN", case)],
            capture_output=True,
            text=True,
            timeout=300,
        )  # a hang raises TimeoutExpired
        assert proc.returncode == 0, proc.stderr
        assert "batch 4" in proc.stdout
