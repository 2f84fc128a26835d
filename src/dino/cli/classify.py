"""``dino classify``: label new images with a labeled bank's k-NN vote or a fine-tuned head."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dino.cli.flags import add_loader_flags, add_view_flags, add_weights_flags, check_output
from dino.config import KNN_HEADLINE_K, KNN_TEMPERATURE
from dino.errors import DinoError


def register(sub: Any) -> None:
    c = sub.add_parser(
        "classify",
        help="label new images by the k-NN vote of a labeled folder (or a fine-tuned classifier)",
        description="Label every image below --images: the k nearest images of --bank (a folder "
        "with one subfolder per class) vote for their class with weight exp(sim / T), as in "
        "`dino knn`; or, for a classifier written by `dino finetune`, its head decides (no "
        "bank). Writes a CSV: file,label,score (the vote share or probability), then the "
        "neighbours and their similarities. The bank's features are cached and reused while "
        "the bank, the weights and the view are unchanged.",
    )
    add_weights_flags(c)
    add_view_flags(c, data_default=None)
    c.add_argument(
        "--bank",
        default=None,
        metavar="DIR",
        help="labeled images: a folder with one subfolder of images per class, or "
        "'fashion-mnist' (its training split); not with a fine-tuned classifier",
    )
    c.add_argument("--images", required=True, metavar="DIR", help="folder of images to label")
    c.add_argument(
        "--output", required=True, metavar="CSV", help="the predictions (must not exist)"
    )
    c.add_argument(
        "--k",
        type=int,
        default=KNN_HEADLINE_K,
        help=f"neighbours that vote (default {KNN_HEADLINE_K}, the paper's)",
    )
    c.add_argument(
        "--temperature",
        type=float,
        default=KNN_TEMPERATURE,
        help=f"T of the vote weights exp(sim / T) (default {KNN_TEMPERATURE})",
    )
    c.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="where the bank's features are cached (default: bank-features/ beside --output)",
    )
    c.add_argument(
        "--any-size",
        action="store_true",
        help="resize images of another size or channel count than the weights were trained on "
        "(refused by default when the weights record it)",
    )
    c.add_argument(
        "--sheet", default=None, metavar="PNG", help="also draw new images with their neighbours"
    )
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_loader_flags(c)
    c.set_defaults(run=classify)


def classify(args: argparse.Namespace) -> int:
    from dino.cli.flags import eval_view, load_weights
    from dino.eval.classify import classify_images, open_picture, read_classifier
    from dino.eval.outputs import refuse_existing

    if args.sheet:
        check_output(args.sheet, "--sheet", "file")
        refuse_existing(args.sheet, "--sheet")
    refuse_existing(args.output, "--output")
    if args.bank is not None and read_classifier(args.weights) is not None:
        raise DinoError(
            f"{args.weights} is a fine-tuned classifier, which labels images with its own head; "
            "drop --bank, or pass the backbone weights it was fine-tuned from to vote with a bank"
        )
    backbone = load_weights(args)
    cache = args.cache_dir or str(Path(args.output).absolute().parent / "bank-features")
    res = classify_images(
        args.weights if args.bank is None else backbone,
        args.images,
        bank=args.bank,
        output=args.output,
        k=args.k,
        temperature=args.temperature,
        view=eval_view(args, args.bank or args.weights, backbone),
        cache_dir=cache,
        any_size=args.any_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
    )
    if args.sheet:
        from dino.atomic_files import atomic_write
        from dino.viz.drawing import neighbours_sheet

        picture = neighbours_sheet(res["examples"], open_picture)
        Path(args.sheet).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.sheet), lambda f: picture.save(f, format="PNG"))
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=2))
        return 0
    counts = ", ".join(f"{c} {n}" for c, n in res["counts"].items() if n)
    how = f"{res['k']}-NN vote of {res['bank_images']} bank images" if args.bank else "its head"
    print(f"{res['images']} images labeled by {how}: {counts}")
    if "accuracy" in res:
        print(f"accuracy on the {res['scored']} images in class folders: {res['accuracy']:.2f}%")
    print(f"predictions -> {args.output}")
    if args.sheet:
        print(f"contact sheet -> {args.sheet}")
    return 0
