"""``dino extract``, ``dino knn`` and ``dino linear``: evaluations of frozen features."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dino.atomic_files import write_json
from dino.cli.flags import (
    add_loader_flags,
    add_view_flags,
    add_weights_flags,
    eval_view,
    load_weights,
)
from dino.config import KNN_KS, KNN_TEMPERATURE


def register(sub: Any) -> None:
    e = sub.add_parser(
        "extract",
        help="save the features of every image of a folder",
        description="Features of a frozen backbone for every image of a folder (recursively; the "
        "first-level subfolder is the class) or of a split of the built-in data set, written as "
        "features.npy with index.csv (paths, labels) and meta.json.",
    )
    add_weights_flags(e)
    add_view_flags(e, data_default=None)
    e.add_argument(
        "--data",
        required=True,
        help="a folder of images (class subfolders give labels) or 'fashion-mnist'",
    )
    e.add_argument(
        "--split",
        default="train",
        choices=["train", "test"],
        help="split of the built-in data set to extract (folders: ignored)",
    )
    e.add_argument(
        "--output",
        default="features",
        metavar="DIR",
        help="folder for features.npy, index.csv and meta.json (default: features)",
    )
    e.add_argument(
        "--patch-tokens",
        action="store_true",
        help="also write patch_tokens.npy: the last block's patch tokens (float16 [N, h, w, D], "
        "written batch by batch; read it with np.load(path, mmap_mode='r')); ViTs only",
    )
    add_loader_flags(e)
    e.set_defaults(run=extract)

    k = sub.add_parser(
        "knn",
        help="weighted k-NN accuracy of frozen features",
        description="Weighted k-NN classification: each of the k nearest training "
        "features (cosine) votes for its class with weight exp(sim / T).",
    )
    add_weights_flags(k)
    add_view_flags(k)
    k.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=list(KNN_KS),
        help=f"numbers of neighbours to report (default: {' '.join(map(str, KNN_KS))}; 20 is "
        "the paper's headline number)",
    )
    k.add_argument(
        "--temperature",
        type=float,
        default=KNN_TEMPERATURE,
        help=f"T of the vote weights exp(sim / T) (default {KNN_TEMPERATURE}); higher flattens "
        "votes",
    )
    add_subset_flag(k)
    k.add_argument("--output", default=None, metavar="JSON", help="also write the results here")
    add_label_flags(k, "bank")
    add_loader_flags(k)
    k.set_defaults(run=knn)

    lin = sub.add_parser(
        "linear",
        help="linear-probe accuracy of frozen features",
        description="Train a linear classifier on frozen features: SGD momentum 0.9, "
        "lr 0.001 x batch / 256, cosine, no weight decay; RandomResizedCrop + flip for training, "
        "Resize + CenterCrop for evaluation. Resumes from the output folder's checkpoint.",
    )
    add_weights_flags(lin)
    add_view_flags(lin)
    lin.add_argument(
        "--epochs",
        type=int,
        default=100,
        help="training epochs (100 in the paper; fewer for a quick estimate)",
    )
    lin.add_argument(
        "--lr",
        type=float,
        default=0.001,
        help="learning rate for a batch of 256, scaled with --batch-size (default "
        "0.001); sweep it (x10, /10) when accuracy matters",
    )
    lin.add_argument(
        "--n-last-blocks",
        type=int,
        default=None,
        help="concatenate the [CLS] tokens of this many last blocks (default: 4, "
        "or 1 for ViT-B and wider as in the paper)",
    )
    lin.add_argument(
        "--avgpool",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also concatenate the average-pooled patch tokens of the last block "
        "(default: on for ViT-B and wider only)",
    )
    lin.add_argument(
        "--cached",
        action="store_true",
        help="extract features once without augmentation and train on them: "
        "minutes instead of hours, slightly lower accuracy",
    )
    lin.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help="checkpoint.pth and results.json go here (default: <run>/linear for a "
        "run folder, else ./linear-<weights name>)",
    )
    lin.add_argument(
        "--restart",
        action="store_true",
        help="ignore a checkpoint in the output folder and start over",
    )
    lin.add_argument(
        "--val-every",
        type=int,
        default=1,
        help="evaluate every N epochs (default 1); raise it when evaluation is slow",
    )
    lin.add_argument("--seed", type=int, default=0, help="seed of initialization and data order")
    add_subset_flag(lin)
    add_label_flags(lin, "training set")
    add_loader_flags(lin, batch_size=256)
    lin.set_defaults(run=linear)


def add_subset_flag(parser: argparse.ArgumentParser) -> None:
    """``--subset N``: only the first N images of each split, for quick trials."""
    parser.add_argument(
        "--subset",
        type=int,
        default=0,
        help="use only the first N images of each split, for quick trials (0: all)",
    )


def add_label_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """``--labels-per-class`` and ``--label-seeds``: few-label evaluation (dino.eval.labels)."""
    parser.add_argument(
        "--labels-per-class",
        type=int,
        default=0,
        metavar="N",
        help=f"use only N labeled training images of each class as the {role}, drawn at random "
        "with each --label-seeds seed (0: all labeled images)",
    )
    parser.add_argument(
        "--label-seeds",
        type=int,
        nargs="+",
        default=[0],
        metavar="S",
        help="seeds of the labeled subsets (default: 0); with several, report the mean and "
        "standard deviation over the subsets",
    )


def _spread(values: dict, metric: str) -> str:
    std = values.get(f"{metric}_std")
    return f"{values[metric]:7.2f}" + (f" ± {std:4.2f}" if std is not None else "")


def extract(args: argparse.Namespace) -> int:
    from dino.eval.api import extract_features

    backbone = load_weights(args)
    meta = extract_features(
        backbone,
        args.data,
        args.output,
        eval_view(args, args.data, backbone),
        split=args.split,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        patch_tokens=args.patch_tokens,
    )
    print(f"{meta['count']} features of dim {meta['feature_dim']} -> {meta['files']['features']}")
    if args.patch_tokens:
        shape = "x".join(map(str, meta["patch_tokens"]["shape"]))
        print(f"patch tokens {shape} (float16) -> {meta['files']['patch_tokens']}")
    print(f"index of paths and labels -> {meta['files']['index']}")
    return 0


def knn(args: argparse.Namespace) -> int:
    from dino.eval.api import knn_eval

    backbone = load_weights(args)
    res = knn_eval(
        backbone,
        args.data,
        args.k,
        args.temperature,
        eval_view(args, args.data, backbone),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        subset=args.subset,
        labels_per_class=args.labels_per_class,
        label_seeds=args.label_seeds,
    )
    labels = ""
    if args.labels_per_class:
        seeds = len(res["label_seeds"])
        labels = f" ({args.labels_per_class} per class, mean over {seeds} label seed(s))"
    print(
        f"weighted k-NN, T={args.temperature}: {res['n_train']} train{labels} / {res['n_val']} "
        f"val images, features of dim {res['feature_dim']}"
    )
    print(f"{'k':>5} {'top-1':>7} {'top-5':>7}")
    for k, v in res["knn"].items():
        print(f"{k:>5} {_spread(v, 'top1')} {_spread(v, 'top5')}")
    if args.output:
        write_json(args.output, res)
        print(f"results -> {args.output}")
    return 0


def linear(args: argparse.Namespace) -> int:
    from dino.eval.linear import linear_probe_seeds

    backbone = load_weights(args)
    out = args.output_dir
    if out is None:
        w = Path(args.weights)
        out = str(w / "linear") if w.is_dir() else f"linear-{w.stem}"
    res = linear_probe_seeds(
        backbone,
        args.data,
        labels_per_class=args.labels_per_class,
        label_seeds=args.label_seeds,
        view=eval_view(args, args.data, backbone),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        n_last_blocks=args.n_last_blocks,
        avgpool=args.avgpool,
        cached=args.cached,
        output_dir=out,
        resume=not args.restart,
        val_every=args.val_every,
        num_workers=args.num_workers,
        device=args.device,
        seed=args.seed,
        subset=args.subset,
    )
    kind = "cached features" if args.cached else "augmented views"
    if args.labels_per_class:
        first = res["per_seed"][0]
        print(
            f"linear probe ({kind}, {args.labels_per_class} labeled images per class, "
            f"{len(res['label_seeds'])} label seed(s), {first['epochs']} epochs): top-1 "
            f"{_spread(res, 'top1').strip()}  top-5 {_spread(res, 'top5').strip()}"
        )
    else:
        print(
            f"linear probe ({kind}, {res['n_last_blocks']} last blocks"
            f"{' + avgpool' if res['avgpool'] else ''}, {res['epochs']} epochs): "
            f"top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  "
            f"(best top-1 {res['best_top1']:.2f} at epoch {res['best_epoch']})"
        )
    print(f"results -> {Path(out) / 'results.json'}")
    return 0
