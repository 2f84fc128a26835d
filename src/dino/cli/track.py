"""``dino track``: video object segmentation by label propagation (DAVIS-2017 J&F)."""

from __future__ import annotations

import argparse
from typing import Any

from dino.cli.flags import add_weights_flags, load_weights

DESCRIPTION = """\
Segment videos from their first frame's object mask with frozen ViT patch features, the paper's
DAVIS-2017 semi-supervised protocol (replaces the reference's eval_video_segmentation.py and
davis2017-evaluation's evaluation_method.py).

Each frame's patches take the labels of their --topk most similar patches (cosine, weights
softmax(sim / 0.1)) among the first frame and the --n-last-frames previous frames, within
--size-mask-neighborhood patches of their position. Frames are resized so that their shorter
side is --size px. Only that context is kept in memory.

--data is either
  a DAVIS root:  JPEGImages/480p/<video>/*.jpg, Annotations/480p/<video>/<frame>.png (indexed
                 PNGs of object ids; the first frame's is required), ImageSets/2017/val.txt
                 (the videos to run; without it every folder of JPEGImages/480p/), or
  a folder of frames (any image format, in name order) with --first-mask, and optionally
                 --annotations with ground-truth masks named like the frames.

Output: one indexed PNG per frame with the DAVIS palette, DIR/<video>/<frame>.png. Where ground
truth exists, J (region Jaccard), F (boundary F-measure, DAVIS definition) and J&F are computed
over every annotated frame but the first and the last, per object, then averaged over all
objects; they are printed and written to --json as fractions in [0, 1]."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "track",
        help="video object segmentation by label propagation (DAVIS-2017 J&F)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_weights_flags(p)
    g = p.add_argument_group("input and output")
    g.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="a DAVIS root, or a folder of frames (then --first-mask is required)",
    )
    g.add_argument(
        "--first-mask",
        default=None,
        metavar="PNG",
        help="for a folder of frames: the first frame's mask (indexed PNG of object ids; "
        "greyscale ids or DAVIS colours also work)",
    )
    g.add_argument(
        "--annotations",
        default=None,
        metavar="DIR",
        help="for a folder of frames: ground-truth masks named <frame name>.png, to score",
    )
    g.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="masks go to DIR/<video>/<frame>.png; a video folder that already holds masks is "
        "an error, never overwritten",
    )
    g.add_argument(
        "--json",
        default=None,
        metavar="OUT",
        help='write {"J&F", "J", "F" (fractions in [0, 1]), "videos": {...}} here (must not exist)',
    )
    t = p.add_argument_group("label propagation (defaults: the paper's)")
    t.add_argument(
        "--n-last-frames",
        type=int,
        default=7,
        help="previous frames in the context, besides the first (default 7)",
    )
    t.add_argument(
        "--topk",
        type=int,
        default=5,
        help="neighbours voting for each patch's label (default 5)",
    )
    t.add_argument(
        "--size-mask-neighborhood",
        type=int,
        default=12,
        metavar="PATCHES",
        help="sources lie within this many patches of the target patch (default 12; 0: anywhere)",
    )
    t.add_argument(
        "--size",
        type=int,
        default=480,
        metavar="PX",
        help="shorter side of the frames fed to the network (default 480, the paper's; the "
        "cost grows with its square, so try 240 on a CPU)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dino.eval.label_propagation import TrackSettings
    from dino.eval.video_segmentation import video_segmentation

    settings = TrackSettings(args.n_last_frames, args.topk, args.size_mask_neighborhood, args.size)
    res = video_segmentation(
        lambda: load_weights(args),
        args.data,
        args.output,
        first_mask=args.first_mask,
        annotations=args.annotations,
        settings=settings,
        json_out=args.json,
        device=args.device,
    )
    videos = res["videos"]
    frames = sum(v["frames"] for v in videos.values())
    print(f"{len(videos)} videos, {frames} frames -> {res['output']}")
    if res["J&F"] is None:
        print("no ground truth for the predicted frames: no score")
    else:
        print(
            f"J&F {res['J&F']:.3f}  J {res['J']:.3f}  F {res['F']:.3f}  (fractions in [0, 1], "
            f"{res['objects']} objects)"
        )
    if args.json:
        print(f"results -> {args.json}")
    return 0
