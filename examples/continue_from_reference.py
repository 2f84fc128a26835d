"""Continue DINO pretraining from the published ViT-S/16 weights on your own images.

Starting from ``dino_vits16`` (the reference code's ViT-S/16, downloaded once into the torch hub
cache) adapts its features to your images with far less data and compute than training from
scratch. Only the backbones start pretrained: the DINO head is new, so the head's last layer
stays frozen for the first epoch and the learning rate is lower than from scratch.

    python examples/continue_from_reference.py /path/to/images --epochs 10

The folder needs images only; with ``train/`` and ``val/`` class subfolders the script also
compares the weighted k-NN accuracy before and after. From the command line:

    dino train --config vit_small_100ep --init dino_vits16 --data /path/to/images \
        --epochs 10 --lr 0.0001 --warmup-epochs 1 --out-dim 16384 --momentum-teacher 0.998
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dino
from dino.eval import knn_eval


def has_labels(folder: Path) -> bool:
    return (folder / "train").is_dir() and any((folder / d).is_dir() for d in ("val", "test"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a folder of your images")
    parser.add_argument("--init", default="dino_vits16", help="weights to start from")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="per process; lower on OOM")
    parser.add_argument("--output-dir", default="runs/continued")
    args = parser.parse_args()

    cfg = dino.load_config(
        "vit_small_100ep",  # ViT-S/16, the reference recipe's crops and schedules
        {
            "data": str(args.data),
            "init": args.init,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            # a pretrained backbone needs smaller steps than a random one
            "lr": 0.0001,
            "warmup_epochs": 1,
            # a smaller dataset needs fewer prototypes, and a slower teacher keeps more of the
            # pretrained features early on
            "out_dim": 16384,
            "momentum_teacher": 0.998,
            "output_dir": args.output_dir,
        },
    )
    if has_labels(args.data):
        before = knn_eval(args.init, str(args.data))["knn"]["20"]["top1"]
        print(f"k-NN top-1 of {args.init} before: {before:.2f}")
    results = dino.train(cfg)
    if results.get("knn"):
        print(f"k-NN top-1 after {args.epochs} epochs: {results['knn']['20']['top1']:.2f}")
    print("report:", dino.report(args.output_dir)["html"])


if __name__ == "__main__":
    main()
