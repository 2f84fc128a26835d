"""``dino copy-detection``: copy detection with frozen ViT features (Copydays)."""

from __future__ import annotations

import argparse
from typing import Any

from dino.cli.flags import (
    add_json_flag,
    add_num_workers_flag,
    add_weights_flags,
    load_weights,
    print_outputs,
)

DESCRIPTION = """\
Find the original of each copy by the cosine similarity of [CLS] + GeM-pooled (p = 4) patch
tokens of a frozen ViT, after PCA whitening, the paper's Copydays protocol (replaces the
reference's eval_copy_detection.py).

Images are resized to --imsize x --imsize. The whitening is learned on --whitening (default: no
whitening, as the reference); the distractors join the originals in the database.

Either
  --data DIR     Copydays: DIR/original/*.jpg and the query blocks DIR/strong/,
                 DIR/jpegqual/<3..75>/, DIR/crops/<10..80>/ (those present are used). Reports
                 mAP (AP on the first 20 results) per block and for the strong, jpeg and crops
                 subsets; the paper reports strong.
or
  --originals DIR --copies DIR
                 two folders of images: --matches lists each copy's best match (an original or
                 a distractor) and its similarity.

Scores are fractions in [0, 1]."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "copy-detection",
        help="copy detection: Copydays mAP, or each copy's best match among originals",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_weights_flags(p)
    g = p.add_argument_group("input and output")
    g.add_argument("--data", default=None, metavar="DIR", help="a Copydays folder")
    g.add_argument("--originals", default=None, metavar="DIR", help="a folder of originals")
    g.add_argument("--copies", default=None, metavar="DIR", help="a folder of suspected copies")
    g.add_argument(
        "--distractors",
        default=None,
        metavar="DIR",
        help="other images added to the database (the paper: 10k YFCC100M images)",
    )
    g.add_argument(
        "--whitening",
        default=None,
        metavar="DIR",
        help="images to learn the whitening on (default: no whitening; the paper: 20k other "
        "YFCC100M images than its distractors)",
    )
    g.add_argument(
        "--no-whitening",
        action="store_true",
        help="compare the descriptors unwhitened (the default without --whitening)",
    )
    g.add_argument(
        "--matches",
        default=None,
        metavar="CSV",
        help="write query,best_match,similarity rows (must not exist)",
    )
    add_json_flag(g)
    f = p.add_argument_group("features")
    f.add_argument(
        "--imsize",
        type=int,
        default=320,
        metavar="PX",
        help="images are resized to this square size (default 320, the paper's)",
    )
    f.add_argument(
        "--batch-size", type=int, default=16, help="images per forward pass (default 16)"
    )
    add_num_workers_flag(f)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dino.errors import DinoError
    from dino.eval.copy_detection import copy_detection

    if args.whitening is not None and args.no_whitening:
        raise DinoError("--whitening and --no-whitening contradict each other; drop one")

    res = copy_detection(
        lambda: load_weights(args),
        data=args.data,
        originals=args.originals,
        copies=args.copies,
        distractors=args.distractors,
        whitening=None if args.no_whitening else args.whitening,
        imsize=args.imsize,
        matches_csv=args.matches,
        json_out=args.json,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
    )
    white = (
        f"whitening of {res['whitening_dims']} dims from {res['whitening_images']} images of "
        f"{res['whitening_learned_on']}"
        if res["whitening_dims"]
        else "no whitening"
    )
    print(f"{res['n_originals']} originals + {res['n_distractors']} distractors, {white}")
    if "mAP" in res:
        for name, value in res["blocks"].items():
            print(f"{name:>12}: mAP {value:.3f}")
        print("  ".join(f"{k} mAP {v:.3f}" for k, v in res["mAP"].items()))
    else:
        print(f"{res['n_copies']} copies matched")
    print("(scores are fractions in [0, 1])")
    print_outputs({"matches": args.matches, "results": args.json})
    return 0
