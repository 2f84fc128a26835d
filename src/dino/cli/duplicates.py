"""``dino duplicates``: groups of near-duplicate images within one folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dino.cli.flags import (
    add_images_flags,
    add_loader_flags,
    add_view_flags,
    add_weights_flags,
    print_outputs,
)
from dino.eval.duplicates import DEFAULT_THRESHOLD

#: Groups drawn in duplicates.png (the largest first) and images drawn per group.
PICTURE_GROUPS, PICTURE_IMAGES = 12, 8

DESCRIPTION = f"""\
Find groups of near-duplicate images (crops, rescales, re-encodes, colour edits of one image)
within a folder: two images are near-duplicates when the cosine similarity of their [CLS]
features is at least --threshold; chains of near-duplicates form one group. Similarities are
computed in blocks, so no N x N matrix is held in memory.

Writes into --output:
  duplicates.csv    group,file,similarity: one row per image of a group (groups of two or
                    more, numbered from 0, each led by its first file in folder order);
                    similarity is the cosine similarity to the group's first file
  duplicates.png    the {PICTURE_GROUPS} largest groups, one row each
  summary.json      the counts and the threshold"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "duplicates",
        help="groups of near-duplicate images within a folder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_weights_flags(p)
    add_images_flags(p, "test", "duplicates.csv, duplicates.png and summary.json")
    g = p.add_argument_group("duplicates")
    g.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"cosine similarity in (0, 1] from which two images are near-duplicates (default "
        f"{DEFAULT_THRESHOLD}, chosen by measurement: docs/folders.md); lower finds more "
        "edited copies and more false pairs",
    )
    add_view_flags(p, data_default=None)
    add_loader_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dino.cli.flags import eval_view, load_weights
    from dino.devices import resolve_device
    from dino.eval.clusters import normalized
    from dino.eval.duplicates import duplicate_groups
    from dino.eval.folder_features import folder_features, open_images, progress
    from dino.eval.outputs import refuse_existing, write_csv, write_json
    from dino.viz.drawing import titled_rows

    out = Path(args.output)
    refuse_existing(out / "duplicates.csv", "--output")
    source = open_images(args.data, args.split)
    backbone = load_weights(args)
    view = eval_view(args, args.data, backbone)
    device = resolve_device(args.device)
    feats, _, rows = folder_features(
        backbone, source, view, args.batch_size, args.num_workers, device
    )
    x = normalized(feats)
    bar = progress(len(x), "similarities")
    groups = duplicate_groups(x, args.threshold, progress=bar.update)
    bar.close()
    paths = [source.paths[i] for i in rows]
    table = []
    for g, members in enumerate(groups):
        sims = x[members] @ x[members[0]]
        table += [[g, paths[m], f"{s:.6f}"] for m, s in zip(members, sims, strict=True)]
    write_csv(out / "duplicates.csv", ["group", "file", "similarity"], table)
    largest = sorted(groups, key=len, reverse=True)[:PICTURE_GROUPS]
    if largest:  # one row per group
        picture_rows = [
            [(source.picture(int(rows[m])), Path(paths[m]).stem[:10]) for m in g[:PICTURE_IMAGES]]
            for g in largest
        ]
        titled_rows(picture_rows).save(out / "duplicates.png")
    in_groups = sum(len(g) for g in groups)
    write_json(
        out / "summary.json",
        {
            "data": args.data,
            "weights": getattr(getattr(backbone, "weights_info", None), "source", None),
            "images": len(paths),
            "threshold": args.threshold,
            "groups": len(groups),
            "images_in_groups": in_groups,
            "largest_group": max((len(g) for g in groups), default=0),
            "view": view.to_dict(),
        },
    )
    print(
        f"{len(groups)} groups of near-duplicates ({in_groups} of {len(paths)} images) at "
        f"cosine similarity >= {args.threshold}"
    )
    print_outputs(
        {
            "groups": str(out / "duplicates.csv"),
            "picture": str(out / "duplicates.png") if groups else None,
        }
    )
    return 0
