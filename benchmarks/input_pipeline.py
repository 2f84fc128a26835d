"""Multi-crop views per second per CPU worker: the PIL path vs the batched tensor path.

* PIL path (``dino.data.multicrop.MultiCropTransform``, what DataLoader workers run for a folder
  of images): one image at a time, timed from the JPEG file (decode included) and from the
  decoded PIL image;
* tensor path (``dino.data.tensor_aug.TensorMultiCrop``, what the training process runs for an
  in-memory dataset): a batch of decoded ``uint8`` tensors at once.

Both for the recipe's views (2 x 224 + 8 x 96) from JPEG files, synthetic photographs drawn
with PIL (or ``skimage.data`` pictures when scikit-image is installed), and for the built-in
Fashion-MNIST preset (read at run time). One thread, as one DataLoader worker has; rounds of
the paths alternate.

    python benchmarks/input_pipeline.py
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import machine_name, save_results, stamp, table
from PIL import Image, ImageDraw

from dino.config import Config, load_config
from dino.data.datasets import TensorImages, fashion_mnist, load_image
from dino.data.multicrop import MultiCropTransform
from dino.data.tensor_aug import TensorMultiCrop
from dino.training.setup import Batches, Dist

#: Size of the synthetic JPEGs: a typical ImageNet photograph.
PHOTO_SIZE = (500, 375)


def draw_photo(i: int, size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    """A noise-free synthetic picture: a color gradient, ellipses, rectangles and lines."""
    w, h = size
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, (2, 3))
    t = (xx / w * math.cos(i) + yy / h * math.sin(i)) % 1.0
    img = (base[0] * (1 - t[..., None]) + base[1] * t[..., None]).astype(np.uint8)
    im = Image.fromarray(img, "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        box = [x0, y0, x0 + rng.uniform(10, w / 2), y0 + rng.uniform(10, h / 2)]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=color)
        elif kind == 1:
            draw.rectangle(box, fill=color)
        else:
            draw.line(box, fill=color, width=int(rng.integers(2, 12)))
    return im


def sample_photos(n: int) -> list[Image.Image]:
    """``n`` RGB pictures of :data:`PHOTO_SIZE`: skimage's when installed, else drawn."""
    try:
        import skimage.data as sk

        names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"]
        pics = [Image.fromarray(getattr(sk, name)()).convert("RGB") for name in names]
        return [pics[i % len(pics)].resize(PHOTO_SIZE, Image.BICUBIC) for i in range(n)]
    except ImportError:
        return [draw_photo(i) for i in range(n)]


def tensor_aug(cfg: Config, images: torch.Tensor) -> TensorMultiCrop:
    """The batched augmentation the training loop builds for this config."""
    data = TensorImages(images, None, [], "benchmark")
    cfg = load_config(overrides={**cfg.to_dict(), "batch_size": len(images), "augment": "tensor"})
    return Batches(cfg, data, Dist(), torch.device("cpu")).aug


def measure(
    name: str,
    cfg: Config,
    files: list[Path] | None,
    pil_images: list[Image.Image],
    batch: torch.Tensor,
    rounds: int,
) -> list[dict]:
    """Views/s of each path on ``len(pil_images)`` images per round, rounds alternating."""
    n = len(pil_images)
    n_views = 2 + cfg.data.local_crops
    pil = MultiCropTransform(cfg.data)
    aug = tensor_aug(cfg, batch)
    idx = np.arange(n)
    paths: dict[str, object] = {}
    if files is not None:
        paths["PIL, from JPEG files"] = lambda: [pil(load_image(f)) for f in files]
        paths["decode only (PIL)"] = lambda: [load_image(f) for f in files]
    paths["PIL, decoded images"] = lambda: [pil(im) for im in pil_images]
    paths["tensor, decoded uint8 batch"] = lambda: aug(batch, idx, 0, 0)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds + 1):  # round 0 warms up
        for key in list(paths) if r % 2 == 0 else list(paths)[::-1]:
            t0 = time.perf_counter()
            paths[key]()
            if r:
                times[key].append(time.perf_counter() - t0)
    pil_key = "PIL, from JPEG files" if files is not None else "PIL, decoded images"
    rows = []
    for key, ts in times.items():
        sec = statistics.median(ts)
        views = 0 if key.startswith("decode") else n * n_views
        row = {
            "preset": name,
            "path": key,
            "images": n,
            "ms_per_image": 1000 * sec / n,
            "views_per_s": views / sec if views else None,
        }
        if views and key != pil_key:
            row["x_vs_pil"] = statistics.median(
                p / t for p, t in zip(times[pil_key], ts, strict=True)
            )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="1 = one DataLoader worker")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []

    recipe = load_config("default")
    photos = sample_photos(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, im in enumerate(photos):
            files.append(Path(tmp) / f"{i}.jpg")
            im.save(files[-1], quality=90)
        decoded = [load_image(f) for f in files]
        batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in decoded])
        rows += measure("recipe 2x224+8x96", recipe, files, decoded, batch, args.rounds)

    preset = load_config("fashion-mnist")
    fm = fashion_mnist("train").images[: args.images]
    gray = [Image.fromarray(x[0].numpy(), "L").convert("RGB") for x in fm]
    d = preset.data
    label = f"fashion-mnist 2x{d.global_size}+{d.local_crops}x{d.local_size}"
    rows += measure(label, preset, None, gray, fm, args.rounds)

    cols = ["preset", "path", "ms_per_image", "views_per_s", "x_vs_pil"]
    print(table(rows, cols, f"multi-crop, {args.threads} thread(s), median of {args.rounds}"))
    if not args.no_save:
        device = torch.device("cpu")
        result = {**stamp(device), "threads": args.threads, "rows": rows}
        path = save_results(
            machine_name(device), "input_pipeline", f"threads{args.threads}", result
        )
        print(f"written to {path}")


if __name__ == "__main__":
    main()
