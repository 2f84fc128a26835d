"""Seconds of the weighted k-NN evaluation of the built-in run: features of the 70k
Fashion-MNIST images (60k bank + 10k queries) with the preset's backbone, then the vote.

The backbone is randomly initialized (the time does not depend on the weights); the preset is
read at run time. The same code path as the evaluation during training
(``dino.training.knn.teacher_knn``: ``eval_batches`` -> ``extract`` -> ``weighted_knn``).

    python benchmarks/knn_eval.py                    # fp32 and bf16 (where supported)
    python benchmarks/knn_eval.py --subset 5000      # a quick trial
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import machine_name, save_results, stamp, table

from dino.config_load import load_config
from dino.data.datasets import open_training_data
from dino.devices import AUTOCAST_DTYPES, resolve_device, resolve_precision
from dino.eval.features import extract, tensor_eval_batches
from dino.eval.neighbors import weighted_knn
from dino.models.backbones import build_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fashion-mnist")
    parser.add_argument("--precision", default="fp32,auto", help="comma list (auto: bf16 ...)")
    parser.add_argument("--batch-size", type=int, default=512, help="as during training")
    parser.add_argument("--subset", type=int, default=0, help="first N images of each split")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.preset)
    device = resolve_device(args.device)
    data = open_training_data(cfg.data.data, args.subset)
    assert data.knn_bank is not None and data.knn_query is not None
    torch.manual_seed(0)
    m = cfg.model
    backbone = build_backbone(m.arch, m.patch_size, cfg.data.global_size, m.depth).to(device)
    backbone.eval()
    d = cfg.data
    rows = []
    for precision in dict.fromkeys(resolve_precision(p, device) for p in args.precision.split(",")):
        dtype = AUTOCAST_DTYPES[precision]
        row: dict = {"precision": precision}
        feats = []
        for split, ds in (("bank", data.knn_bank), ("query", data.knn_query)):
            batches = tensor_eval_batches(
                ds, d.eval_resize, d.eval_crop, d.mean, d.std, args.batch_size, device
            )
            t0 = time.perf_counter()
            feats.append(extract(backbone, batches, dtype))
            row[f"extract_{split}_s"] = time.perf_counter() - t0
        (fb, yb), (fq, yq) = feats
        t0 = time.perf_counter()
        acc = weighted_knn(
            fb.to(device), yb.to(device), fq.to(device), yq.to(device),
            cfg.run.knn_k, cfg.run.knn_temp, num_classes=len(data.knn_bank.classes),
        )  # fmt: skip
        row["classify_s"] = time.perf_counter() - t0
        row["total_s"] = row["extract_bank_s"] + row["extract_query_s"] + row["classify_s"]
        row["images"] = len(fb) + len(fq)
        row["images_per_s"] = row["images"] / (row["extract_bank_s"] + row["extract_query_s"])
        row["top1_k20_random_init"] = acc.get("20", next(iter(acc.values())))["top1"]
        rows.append(row)
        print(row, flush=True)
    label = f"{args.preset} {m.arch}/{m.patch_size} depth {m.depth} at {d.eval_crop}px"
    cols = ["precision", "images", "extract_bank_s", "extract_query_s", "classify_s", "total_s"]
    print(table(rows, cols + ["images_per_s"], f"k-NN evaluation, {label}, on {device}"))
    if not args.no_save:
        result = {**stamp(device), "config": label, "subset": args.subset, "rows": rows}
        path = save_results(machine_name(device), "knn_eval", args.preset, result)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
