"""``dino cluster``: k-means clusters of the images of a folder, by their frozen features."""

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

DESCRIPTION = """\
Group the images of a folder into --k clusters: k-means (faiss) on the L2-normalized [CLS]
features of a frozen backbone.

Writes into --output:
  clusters.csv      file,cluster,distance: every image's cluster and its distance to the
                    cluster's centre (unit-length features: 0 to 2)
  cluster-<c>.png   a contact sheet per cluster: its images nearest the centre
  scores.json       cluster sizes and, for labeled images (class subfolders, fashion-mnist),
                    purity and NMI against the labels (fractions in [0, 1])"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "cluster",
        help="k-means clusters of a folder of images, with a contact sheet per cluster",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_weights_flags(p)
    add_images_flags(p, "test", "clusters.csv, the contact sheets and scores.json")
    g = p.add_argument_group("clusters")
    g.add_argument("--k", type=int, required=True, help="number of clusters")
    g.add_argument("--seed", type=int, default=0, help="seed of k-means' start (default 0)")
    add_view_flags(p, data_default=None)
    add_loader_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from dino.cli.flags import eval_view, load_weights
    from dino.devices import resolve_device
    from dino.eval.clusters import (
        check_k,
        cluster_scores,
        faiss_module,
        kmeans,
        normalized,
        sheet_members,
        sheet_path,
    )
    from dino.eval.folder_features import folder_features, open_images
    from dino.eval.outputs import refuse_existing, write_csv, write_json
    from dino.viz.drawing import contact_sheet

    out = Path(args.output)
    refuse_existing(out / "clusters.csv", "--output")
    source = open_images(args.data, args.split)
    check_k(args.k, len(source.paths), args.data)
    faiss_module()
    backbone = load_weights(args)
    view = eval_view(args, args.data, backbone)
    device = resolve_device(args.device)
    feats, labels, rows = folder_features(
        backbone, source, view, args.batch_size, args.num_workers, device
    )
    check_k(args.k, len(rows), f"{args.data} that could be read")
    clusters, distances, _ = kmeans(normalized(feats), args.k, seed=args.seed)
    paths = [source.paths[i] for i in rows]
    write_csv(
        out / "clusters.csv",
        ["file", "cluster", "distance"],
        ([p, int(c), f"{d:.6f}"] for p, c, d in zip(paths, clusters, distances, strict=True)),
    )
    for c in range(args.k):
        members = sheet_members(clusters, distances, c)
        titles = [
            source.classes[labels[i]] if labels[i] >= 0 else Path(paths[i]).stem for i in members
        ]
        pictures = [source.picture(int(rows[i])) for i in members]
        if pictures:
            contact_sheet(pictures, [t[:10] for t in titles]).save(sheet_path(out, c, args.k))
    scores = cluster_scores(labels, clusters)
    sizes = np.bincount(clusters, minlength=args.k)
    write_json(
        out / "scores.json",
        {
            "data": args.data,
            "weights": getattr(getattr(backbone, "weights_info", None), "source", None),
            "images": len(paths),
            "k": args.k,
            "sizes": sizes.tolist(),
            "scores": scores,
            "view": view.to_dict(),
        },
    )
    print(f"{len(paths)} images in {args.k} clusters (sizes {sizes.min()} to {sizes.max()})")
    if scores:
        print(f"against the labels: purity {scores['purity']:.3f}  NMI {scores['nmi']:.3f}")
    print_outputs({"clusters": str(out / "clusters.csv"), "scores": str(out / "scores.json")})
    print(f"contact sheets -> {out}/cluster-*.png")
    return 0
