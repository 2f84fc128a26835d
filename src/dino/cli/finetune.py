"""``dino finetune``: supervised fine-tuning of a pretrained backbone with a linear head."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dino.cli.flags import add_loader_flags, add_view_flags, add_weights_flags


def register(sub: Any) -> None:
    f = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained backbone and a linear head on labeled images",
        description="Supervised fine-tuning of every layer (AdamW, layer-wise lr decay, warm-up "
        "+ cosine, label smoothing, drop path, RandAugment on random resized crops). Writes "
        "OUT/classifier.pth (for `dino classify` without a bank) and OUT/results.json (top-1 "
        "and top-5 in percent on the val split); checkpoints every epoch, --resume continues. "
        "Use --weights random --arch ... for the from-scratch baseline.",
    )
    add_weights_flags(f)
    add_view_flags(f)
    f.add_argument("--output-dir", required=True, metavar="OUT", help="folder of the results")
    f.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    f.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="train until this process has used this much CPU time instead of --epochs (the "
        "schedule follows the budget): compare starting points at equal compute",
    )
    f.add_argument(
        "--lr", type=float, default=1e-3, help="peak lr for a batch of 256 (default 1e-3)"
    )
    f.add_argument(
        "--layer-decay",
        type=float,
        default=0.65,
        help="layer-wise lr decay: block i of L gets lr x decay^(L-i) (default 0.65; 1: none, "
        "the choice for --weights random)",
    )
    f.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    f.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    f.add_argument("--label-smoothing", type=float, default=0.1, help="default 0.1")
    f.add_argument(
        "--warmup", type=float, default=0.1, help="fraction of training warming up (default 0.1)"
    )
    f.add_argument(
        "--randaugment",
        type=int,
        default=9,
        metavar="M",
        help="RandAugment magnitude (0-30; default 9, DeiT's; 0: crops and flips only)",
    )
    f.add_argument(
        "--labels-per-class",
        type=int,
        default=0,
        metavar="N",
        help="train on N labeled images of each class, drawn with --label-seed (0: all)",
    )
    f.add_argument("--label-seed", type=int, default=0, help="seed of the labeled subset")
    f.add_argument("--subset", type=int, default=0, help="only the first N images of each split")
    f.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pth")
    f.add_argument("--seed", type=int, default=0, help="seed of the head, order, augmentations")
    add_loader_flags(f, batch_size=64)
    f.set_defaults(run=finetune)


def finetune(args: argparse.Namespace) -> int:
    from dino.cli.flags import eval_view, load_weights
    from dino.eval.finetune import CLASSIFIER, finetune_backbone

    backbone = load_weights(args)
    res = finetune_backbone(
        backbone,
        args.data,
        args.output_dir,
        view=eval_view(args, args.data, backbone),
        epochs=args.epochs,
        time_budget=args.time_budget,
        batch_size=args.batch_size,
        lr=args.lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        drop_path=args.drop_path,
        label_smoothing=args.label_smoothing,
        warmup=args.warmup,
        randaugment=args.randaugment,
        labels_per_class=args.labels_per_class,
        label_seed=args.label_seed,
        resume=args.resume,
        subset=args.subset,
        num_workers=args.num_workers,
        device=args.device,
        seed=args.seed,
    )
    print(
        f"fine-tuned {res['steps']} steps ({res['epochs_run']} epochs, {res['cpu_seconds']:.0f} "
        f"CPU s) on {res['n_train']} images: top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}"
    )
    print(f"classifier -> {Path(args.output_dir) / CLASSIFIER}")
    print(f"results -> {Path(args.output_dir) / 'results.json'}")
    return 0
