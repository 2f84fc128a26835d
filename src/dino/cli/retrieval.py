"""``dino retrieval``: image retrieval with frozen features (revisited Oxford and Paris)."""

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
Rank database images by the cosine similarity of frozen global features ([CLS] for a ViT),
the paper's image retrieval protocol (replaces the reference's eval_image_retrieval.py).

Images are shrunk so that their longer side is at most --imsize px (aspect kept);
--multiscale averages the features at scales 1, 1/sqrt(2) and 1/2.

Either
  --data DIR     revisited Oxford or Paris as revisitop downloads them: DIR/roxford5k/
                 gnd_roxford5k.pkl with DIR/roxford5k/jpg/*.jpg (likewise rparis6k; DIR may
                 also be the data set's own folder). Reports mAP and mP@k (revisitop's
                 definitions, junk images ignored) for the Easy, Medium and Hard protocols.
                 The paper: --imsize 224 for Oxford, --imsize 512 --multiscale for Paris.
or
  --queries DIR --database DIR
                 two folders of images (searched recursively). --neighbours writes the --topk
                 neighbours of each query; when both folders hold class subfolders, an image
                 is relevant to the queries of its class name and mAP and precision@k are
                 reported. An image in both folders is never its own neighbour.

Scores are fractions in [0, 1]."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "retrieval",
        help="image retrieval: revisited Oxford/Paris mAP, or neighbours across two folders",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_weights_flags(p)
    g = p.add_argument_group("input and output")
    g.add_argument("--data", default=None, metavar="DIR", help="a revisitop folder")
    g.add_argument(
        "--dataset",
        default=None,
        choices=["roxford5k", "rparis6k"],
        help="which data set of --data, when it holds both",
    )
    g.add_argument("--queries", default=None, metavar="DIR", help="a folder of query images")
    g.add_argument("--database", default=None, metavar="DIR", help="a folder of images to search")
    g.add_argument(
        "--neighbours",
        default=None,
        metavar="CSV",
        help="write query,rank,neighbour,similarity rows for the --topk best of each query "
        "(must not exist)",
    )
    g.add_argument(
        "--topk", type=int, default=10, help="neighbours per query in --neighbours (default 10)"
    )
    add_json_flag(g)
    f = p.add_argument_group("features")
    f.add_argument(
        "--imsize",
        type=int,
        default=224,
        metavar="PX",
        help="longer side at most this (default 224; images are never enlarged)",
    )
    f.add_argument(
        "--multiscale",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="average the features at scales 1, 1/sqrt(2), 1/2 (default: off)",
    )
    f.add_argument(
        "--crop-queries",
        action="store_true",
        help="crop revisitop queries to their box (revisitop's protocol; the paper's script "
        "uses whole query images)",
    )
    f.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[1, 5, 10],
        help="the k of precision@k (default: 1 5 10)",
    )
    add_num_workers_flag(f)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dino.eval.retrieval import image_retrieval

    res = image_retrieval(
        lambda: load_weights(args),
        data=args.data,
        dataset=args.dataset,
        queries=args.queries,
        database=args.database,
        imsize=args.imsize,
        multiscale=args.multiscale,
        crop_queries=args.crop_queries,
        ks=args.k,
        neighbours_csv=args.neighbours,
        topk=args.topk,
        json_out=args.json,
        device=args.device,
        num_workers=args.num_workers,
    )
    if "dataset" in res:
        print(f"{res['dataset']}: {res['n_queries']} queries, {res['n_images']} images")
        for protocol, value in res["mAP"].items():
            pk = "  ".join(f"mP@{k} {v:.3f}" for k, v in res["mP@k"][protocol].items())
            print(f"{protocol:>6}: mAP {value:.3f}  {pk}")
    else:
        print(f"{res['n_queries']} queries, {res['n_database']} database images")
        if res.get("mAP") is not None:
            pk = "  ".join(f"P@{k} {v:.3f}" for k, v in res["precision@k"].items())
            print(f"mAP {res['mAP']:.3f}  {pk}  ({res['scored_queries']} queries with classes)")
    print("(scores are fractions in [0, 1])")
    print_outputs({"neighbours": args.neighbours, "results": args.json})
    return 0
