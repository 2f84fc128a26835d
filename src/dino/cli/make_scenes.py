"""``dino make-scenes``: a built-in scene dataset written as a folder of PNG files, with masks."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from dino.cli.flags import check_output
from dino.data.datasets import SCENE_DATASETS
from dino.errors import DinoError

DESCRIPTION = """\
Write scenes of a built-in scene dataset as image files, the layout `dino train --data`,
`dino knn --data` and `dino segment --data ... --masks ...` read:

  OUTPUT/train/<class>/<i>.png       the first --train train scenes ('/' in a class name
                                     becomes '-': T-shirt-top)
  OUTPUT/val/<class>/<i>.png         the first --val test scenes
  OUTPUT/val-masks/<class>/<i>.png   their object masks (255: object, 0: background)

The folder is written under a temporary name and renamed when complete; an existing OUTPUT is
never written into."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "make-scenes",
        help="write a built-in scene dataset (images and masks) as a folder of PNG files",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output", metavar="OUTPUT", help="the folder to create")
    p.add_argument(
        "--data",
        default=SCENE_DATASETS[-1],
        choices=SCENE_DATASETS,
        help=f"which scenes (default: {SCENE_DATASETS[-1]})",
    )
    p.add_argument("--train", type=int, default=4000, help="train scenes (default 4000)")
    p.add_argument("--val", type=int, default=1000, help="test scenes (default 1000)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm import tqdm

    from dino.data.datasets import builtin_scenes

    for flag, n, most in (("--train", args.train, 60000), ("--val", args.val, 10000)):
        if not 1 <= n <= most:
            raise DinoError(f"{flag} must be in 1..{most} (the split's scenes), got {n}")
    out = Path(args.output)
    if out.exists():
        raise DinoError(f"{out} exists; choose a new folder (make-scenes never writes into one)")
    check_output(out, "OUTPUT")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        for split, sub, n in (("train", "train", args.train), ("test", "val", args.val)):
            scenes = builtin_scenes(args.data, split, n)
            folders = [c.replace("/", "-") for c in scenes.classes]
            for c in folders:
                (partial / sub / c).mkdir(parents=True)
                if sub == "val":
                    (partial / "val-masks" / c).mkdir(parents=True)
            for i in tqdm(range(n), desc=sub, unit="img", leave=False):
                c = folders[int(scenes.labels[i])]
                name = f"{i:05d}.png"
                Image.fromarray(scenes.images[i].permute(1, 2, 0).numpy()).save(
                    partial / sub / c / name
                )
                if sub == "val":
                    mask = scenes.masks[i].numpy().astype("uint8") * 255
                    Image.fromarray(mask).save(partial / "val-masks" / c / name)
        os.rename(partial, out)
    except OSError as exc:
        raise DinoError(
            f"cannot write {out}: {exc.strerror or exc}; choose a folder you can write"
        ) from None
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    print(f"{args.train} train and {args.val} val scenes of {args.data}, with masks -> {out}")
    return 0
