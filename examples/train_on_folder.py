"""Train DINO on a folder of your own images, then look at what it learned.

The script first makes a small labeled folder (``train/`` and ``val/`` with one subfolder per
class): random crops of scikit-image's sample photos when scikit-image is installed, else
generated pictures of three kinds of shapes. Labels are never used for training; they only let
DINO report a weighted k-NN accuracy after every epoch. Then it trains a small ViT on the CPU
(a few minutes), writes the run's HTML report and exports the teacher for timm and ONNX.

    python examples/train_on_folder.py                     # the generated folder
    python examples/train_on_folder.py --data ~/photos     # your own folder instead

The same run from the command line:

    dino train --config default --data FOLDER --arch vit_tiny --patch-size 8 ...
    dino report runs/folder-example
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import dino

SIZE = 64


def _photo_crops(root: Path, per_class: dict[str, int], rng: np.random.Generator) -> bool:
    """Random crops of scikit-image's sample photos, one class per photo (False without it)."""
    try:
        from skimage import data
    except ImportError:
        return False
    photos = {
        "astronaut": data.astronaut(),
        "cat": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
    }
    for split, n in per_class.items():
        for name, pix in photos.items():
            img = Image.fromarray(pix).convert("RGB")
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                side = int(rng.integers(min(img.size) // 3, min(img.size)))
                x0 = int(rng.integers(0, img.width - side + 1))
                y0 = int(rng.integers(0, img.height - side + 1))
                crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((SIZE, SIZE))
                crop.save(root / split / name / f"{i:03d}.png")
    return True


def _shapes(root: Path, per_class: dict[str, int], rng: np.random.Generator) -> None:
    """Generated pictures: a circle, a square or a triangle of a random color, size and place
    on a noisy background."""
    for split, n in per_class.items():
        for shape in ("circle", "square", "triangle"):
            (root / split / shape).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                bg = rng.integers(0, 256, 3)
                pix = np.clip(bg + rng.normal(0, 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pix, "RGB")
                draw = ImageDraw.Draw(img)
                r = int(rng.integers(SIZE // 6, SIZE // 3))
                cx, cy = (int(v) for v in rng.integers(r, SIZE - r, 2))
                color = tuple(int(c) for c in rng.integers(0, 256, 3))
                if shape == "circle":
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
                elif shape == "square":
                    draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
                img.save(root / split / shape / f"{i:03d}.png")


def make_folder(root: Path, train: int = 60, val: int = 20, seed: int = 0) -> Path:
    """A labeled folder ``root/{train,val}/<class>/*.png`` of 64x64 pictures."""
    rng = np.random.default_rng(seed)
    per_class = {"train": train, "val": val}
    if not _photo_crops(root, per_class, rng):
        _shapes(root, per_class, rng)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="your folder (default: generate)")
    parser.add_argument("--output-dir", default="runs/folder-example")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    data = args.data or make_folder(Path("example-images"))

    # The reference recipe ("default"), scaled down to 64-pixel images and a CPU: a ViT-Tiny
    # with 8-pixel patches, 64 / 32 pixel crops, a head of K = 4096 prototypes.
    cfg = dino.load_config(
        "default",
        {
            "data": str(data),
            "arch": "vit_tiny",
            "patch_size": 8,
            "global_size": 64,
            "local_size": 32,
            "local_crops": 4,
            "blur_sigma": [0.1, 0.6],
            "eval_resize": 64,
            "eval_crop": 64,
            "out_dim": 4096,
            "head_hidden_dim": 512,
            "epochs": args.epochs,
            "batch_size": 32,
            "lr": 0.001,
            "warmup_epochs": 1,
            "momentum_teacher": 0.99,
            "freeze_last_layer": 0,
            "output_dir": args.output_dir,
        },
    )
    results = dino.train(cfg)
    if results.get("knn"):
        print("weighted k-NN top-1 (k=20):", results["knn"]["20"]["top1"])

    report = dino.report(args.output_dir)
    print("report:", report["html"])
    exported = dino.export(args.output_dir, Path(args.output_dir) / "export")
    print("timm:", exported["dino"]["timm"]["load"])


if __name__ == "__main__":
    main()
