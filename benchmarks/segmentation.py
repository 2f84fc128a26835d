"""Do DINO's attention maps and patch features segment objects? The comparison of issue 25.

On the 10 000 test scenes of ``fashion-mnist-scenes`` (docs/segmentation.md), the Jaccard index
(%) of the true object masks with the 60 %-mass attention masks of the last block (best head,
mean of heads) and with the PCA foreground of the patch features, for:

* ``dino``: the teacher of a ``dino train --config fashion-mnist-scenes`` run;
* ``random``: the same network at its random initialization (``--weights random --like RUN``);
* ``supervised``: the same ViT trained with labels for the same time
  (``benchmarks/supervised_scenes.py``);
* ``centre prior``: no network, a centred disc with the true mask's area (the same for all).

Two references computed from the masks alone bound what is possible: ``patch_grid_ceiling``,
the Jaccard of the best mask made of whole patches (a patch is in when most of its pixels are
object), which limits the attention masks; ``brightness_oracle``, the best per-image threshold of
the brightness (with the threshold and its direction chosen knowing the true mask), which shows
how far brightness alone separates object from background.

    python benchmarks/segmentation.py --dino /work/runs/scenes-dino \\
        --supervised /work/runs/scenes-supervised --pictures ../docs/images

Writes ``results/segmentation-scenes.json`` (the rows, with the commands and the machine) and,
with ``--pictures DIR``, ``DIR/segmentation-scenes-<row>.png`` (a few test scenes: image, true
mask, each head's attention, the masks, PCA, PCA foreground).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import RESULTS_DIR, stamp

from dino.data.datasets import SCENE_DATASETS, builtin_scenes
from dino.eval.segmentation import jaccard, normalize, score_tensors, segment, upsample_grid
from dino.eval.views import resolve_view
from dino.models.weights import load_backbone

#: Test scenes drawn in the pictures: the first scene of each of these classes.
PICTURE_CLASSES = (0, 1, 5, 8)  # T-shirt/top, trouser, sandal, bag


def patch_grid_ceiling(masks: torch.Tensor, patch: int) -> float:
    """Mean Jaccard (%) of the masks made of whole patches: a patch is in when more than half of
    its pixels are object."""
    n, h, w = masks.shape
    cover = masks.float().view(n, h // patch, patch, w // patch, patch).mean((2, 4))
    grid = upsample_grid(cover > 0.5, (h, w))
    return 100.0 * float(jaccard(grid, masks).double().mean())


def brightness_oracle(images: torch.Tensor, masks: torch.Tensor, levels: int = 64) -> float:
    """Mean over images of the best Jaccard (%) of ``brightness > t`` or ``brightness <= t``
    with the true mask, over ``levels`` thresholds ``t`` (chosen per image, knowing the mask)."""
    best = []
    for start in range(0, len(images), 500):
        x = images[start : start + 500].float().mean(1)  # [B, H, W] brightness
        m = masks[start : start + 500]
        b = torch.zeros(len(x), dtype=torch.float64)
        for t in torch.linspace(0, 255, levels):
            above = x > t
            for pred in (above, ~above):
                b = torch.maximum(b, jaccard(pred, m).double())
        best.append(b)
    return 100.0 * float(torch.cat(best).mean())


def picture_indices(labels: torch.Tensor) -> list[int]:
    return [int((labels == c).nonzero()[0]) for c in PICTURE_CLASSES]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dino", required=True, help="the DINO run folder")
    p.add_argument("--supervised", default=None, help="benchmarks/supervised_scenes.py output")
    p.add_argument("--data", default=SCENE_DATASETS[0], choices=SCENE_DATASETS)
    p.add_argument("--subset", type=int, default=0, help="first N test scenes only (trials)")
    p.add_argument("--pictures", default=None, metavar="DIR", help="write the pictures here")
    p.add_argument("--output", default=None, help="default: results/segmentation-<data>.json")
    args = p.parse_args(argv)
    tag = "scenes" if args.data == SCENE_DATASETS[0] else "photos"
    args.output = args.output or str(RESULTS_DIR / f"segmentation-{tag}.json")

    run = Path(args.dino)
    models = {"dino": load_backbone(run), "random": load_backbone("random", like=run)}
    if args.supervised:
        sup = Path(args.supervised)
        models["supervised"] = load_backbone(sup / "backbone.pth")
    view = resolve_view(args.data, models["dino"].weights_info.run_config)
    scenes = builtin_scenes(args.data, "test", args.subset)
    images, masks = scenes.images, scenes.masks
    patch = int(models["dino"].patch_embed.patch_size[0])

    rows: dict[str, Any] = {}
    for name, model in models.items():
        t0 = time.time()
        rows[name] = score_tensors(model, images, masks, view.mean, view.std, 250)
        rows[name]["weights"] = model.weights_info.source
        rows[name]["seconds"] = round(time.time() - t0, 1)
        j = rows[name]["jaccard"]
        print(
            f"{name:11s} best head {j['attention_best_head']:6.2f}  mean of heads "
            f"{j['attention_mean']:6.2f}  PCA {j['pca']:6.2f}  centre {j['centre_prior']:6.2f}  "
            f"centre of the best head's area {rows[name]['centre_prior_of_best_head_area']:6.2f}",
            flush=True,
        )
    result = {
        "rows": rows,
        "centre_prior": rows["dino"]["jaccard"]["centre_prior"],
        "patch_grid_ceiling": round(patch_grid_ceiling(masks, patch), 2),
        "brightness_oracle": round(brightness_oracle(images, masks), 2),
        "images": int(len(images)),
        "data": args.data,
        "dino_run": str(run),
        "supervised": str(args.supervised) if args.supervised else None,
        "stamp": stamp(torch.device("cpu")),
        "command": " ".join(["python", "benchmarks/segmentation.py", *(argv or sys.argv[1:])]),
    }
    for extra in ("result.json",):
        if args.supervised and (Path(args.supervised) / extra).exists():
            result["supervised_run"] = json.loads((Path(args.supervised) / extra).read_text())
    print(
        f"patch-grid ceiling {result['patch_grid_ceiling']:.2f}, brightness oracle "
        f"{result['brightness_oracle']:.2f}"
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"-> {out}")

    if args.pictures:
        from PIL import Image

        from dino.viz.segmentation import segmentation_sheet

        picks = picture_indices(scenes.labels) if tag == "scenes" else list(range(8))
        pix = images[picks]
        pictures = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in pix]
        folder = Path(args.pictures)
        folder.mkdir(parents=True, exist_ok=True)
        for name, model in models.items():
            seg = segment(model, normalize(pix, view.mean, view.std))
            sheet = segmentation_sheet(pictures, seg, masks[picks], height=96)
            path = folder / f"segmentation-{tag}-{name}.png"
            sheet.save(path)
            print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
