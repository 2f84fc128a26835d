"""``dino attention`` and ``dino report``: pictures of what a network learned."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dino.cli.flags import (
    add_norm_flags,
    add_threshold_flag,
    add_weights_flags,
    load_weights,
    output_names,
)


def register(sub: Any) -> None:
    a = sub.add_parser(
        "attention",
        help="self-attention maps of a ViT on images",
        description="Last-block attention of [CLS] to every patch, one map per head, and masks "
        "keeping the patches that hold --threshold of each head's attention; writes per-head "
        "PNGs and overview.png per image.",
    )
    a.add_argument("images", nargs="+", help="image files or folders of images (any format)")
    add_weights_flags(a)
    a.add_argument(
        "--output",
        default="attention",
        metavar="DIR",
        help="one subfolder per image is written here (default: attention)",
    )
    a.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="PX",
        help="resize the shorter side to this first, 0 keeps the size (default: 480, "
        "or the run's crop size when it trained on crops under 224); larger shows "
        "finer maps at a quadratic cost",
    )
    add_threshold_flag(a)
    add_norm_flags(a)
    a.set_defaults(run=attention)

    r = sub.add_parser(
        "report",
        help="an HTML report of a run: curves and attention maps",
        description="Write RUN_DIR/report/report.html with PNG plots of metrics.jsonl (loss and "
        "k-NN over epochs; learning rate, weight decay, teacher momentum and temperature, teacher "
        "entropy and KL over iterations) and the final teacher's attention on a few images of "
        "the run's data. Needs matplotlib (pip install 'dino[report]').",
    )
    r.add_argument("run_dir", metavar="RUN_DIR", help="a folder that `dino train` wrote")
    r.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="where to write report.html and the PNGs (default: RUN_DIR/report)",
    )
    r.add_argument(
        "--images",
        type=int,
        default=4,
        help="number of images whose attention is drawn (default 4; 0: none)",
    )
    r.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="PX",
        help="resize those images' shorter side to this (default: the run's crop size when "
        "under 224, else 480)",
    )
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    r.set_defaults(run=report)


def attention(args: argparse.Namespace) -> int:
    from dino.data.datasets import image_paths
    from dino.devices import resolve_device
    from dino.viz.attention import default_image_size, save_attention_maps

    backbone = load_weights(args)
    files = image_paths(args.images)
    size = args.image_size
    if size is None:
        size = default_image_size(backbone.weights_info.run_config)
    device = resolve_device(args.device)
    for f, name in zip(files, output_names(files), strict=True):
        res = save_attention_maps(
            backbone,
            f,
            Path(args.output) / name,
            image_size=size or None,
            threshold=args.threshold,
            mean=args.mean,
            std=args.std,
            device=device,
        )
        h, w = res["patch_grid"]
        print(
            f"{f}: {res['attention'].shape[0]} heads on a {h}x{w} patch grid -> {res['overview']}"
        )
    return 0


def report(args: argparse.Namespace) -> int:
    from dino.devices import resolve_device
    from dino.viz.report import write_report

    res = write_report(
        args.run_dir,
        args.output,
        images=args.images,
        image_size=args.image_size,
        device=str(resolve_device(args.device)),
    )
    print(
        f"report -> {res['html']} ({len(res['plots'])} plots, {len(res['attention'])} "
        "attention overviews)"
    )
    return 0
