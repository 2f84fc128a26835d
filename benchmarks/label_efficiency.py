"""How much are labels worth? Top-1 with 1, 10, 100 labeled images per class and with all of them:
DINO features (weighted k-NN, linear probe) against a supervised network trained from scratch on
the same labeled images, and against k-NN on raw pixels.

* **DINO k-NN / DINO linear**: the teacher backbone of a ``dino train`` run folder, frozen;
  ``dino knn`` / ``dino linear --cached`` with ``--labels-per-class N --label-seeds ...``
  (k = 20, or the bank size when smaller; the linear probe's lr is ``--linear-lr``).
* **supervised from scratch**: the run's backbone architecture, randomly initialized, with a
  linear classifier on its [CLS] feature, trained with cross-entropy on the same labeled images
  (the same seeded subsets), with the run's global-view augmentations (crop scale, flip, color
  jitter, grayscale, blur, solarization: one view per image per step), AdamW at the run's
  learning rate and batch size, a cosine schedule in time, for the same time as the DINO run:
  its CPU time (``train_cpu_seconds`` of its ``results.json``; with the same number of threads
  that is its wall time on an idle machine, and it does not depend on what else runs on a shared
  one), measured the same way here; or ``--seconds`` of CPU time.
* **raw pixels**: weighted k-NN on the flattened eval view (normalized pixels), same banks.
* **DINO + fine-tuning / random init + fine-tuning** (with ``--finetune-seconds S``): ``dino
  finetune`` (:func:`dino.eval.finetune.finetune_backbone`: AdamW, warm-up + cosine, label
  smoothing, drop path, RandAugment) of the run's teacher backbone, and of the same network
  randomly initialized, each for ``S`` seconds of this process's CPU time on the same seeded
  subsets (``--finetune-seeds``); layer-wise lr decay 0.65 from DINO, none (1.0) from random
  weights, where no layer holds anything worth keeping.

The mean over the label seeds is shown with the standard deviation (``±``); the supervised
baseline runs once per seed in ``--supervised-seeds`` (each costs the DINO run's wall time).

    python benchmarks/label_efficiency.py --run runs/fmnist
    python benchmarks/label_efficiency.py --run runs/fmnist --seconds 300 --supervised-seeds 0
    python benchmarks/label_efficiency.py --run runs/fmnist --finetune-seconds 600
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from harness import machine_name, save_results, stamp
from torch import nn

from dino.config import Config
from dino.data.crop_draws import view_specs
from dino.data.datasets import TensorImages
from dino.data.tensor_aug import TensorMultiCrop
from dino.devices import AUTOCAST_DTYPES, resolve_device, resolve_precision
from dino.eval.api import knn_eval
from dino.eval.finetune import finetune_backbone
from dino.eval.labels import labeled_subset, mean_spread
from dino.eval.linear import linear_probe_seeds
from dino.eval.views import eval_batches, num_classes, open_labeled, resolve_view
from dino.models.backbones import build_backbone
from dino.models.weights import load_backbone
from dino.training.optim import param_groups

RESULTS = Path(__file__).resolve().parent / "results"


def run_config(run: Path) -> Config:
    from dino.config_load import load_config

    return load_config(str(run / "config.yaml"))


def pixels() -> nn.Module:
    """Raw pixels as features: the flattened (normalized) eval view."""
    flat = nn.Flatten()
    flat.embed_dim = 0  # not used by k-NN
    return flat


def supervised(
    cfg: Config,
    train: TensorImages,
    val: TensorImages,
    seconds: float,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Train the run's backbone from scratch + a linear classifier on ``train`` for ``seconds``
    of this process's CPU time; returns the top-1 on ``val`` and how many steps fitted."""
    m, d, o = cfg.model, cfg.data, cfg.optim
    torch.manual_seed(seed)
    backbone = build_backbone(
        m.arch, m.patch_size, d.global_size, m.depth, m.drop_path_rate, registers=m.registers
    )
    model = nn.Sequential(backbone, nn.Linear(backbone.embed_dim, num_classes(train, val)))
    model.to(device).train()
    batch = min(o.batch_size, len(train))
    peak = o.lr * batch / 256
    optimizer = torch.optim.AdamW(param_groups(model), lr=0.0, weight_decay=0.0)
    for group in optimizer.param_groups:
        if group["apply_wd"]:
            group["weight_decay"] = o.weight_decay
    aug = TensorMultiCrop(
        view_specs(d)[:1], d.brightness, d.contrast, d.saturation, d.hue, d.color_jitter_p,
        d.grayscale_p, tuple(d.blur_sigma), tuple(d.mean), tuple(d.std),
    )  # fmt: skip
    dtype = AUTOCAST_DTYPES[resolve_precision(cfg.run.precision, device)]
    images, labels = train.images.to(device), train.labels.to(device)
    rng = np.random.default_rng(seed)
    start, steps, epoch = time.process_time(), 0, 0
    warmup = 0.05 * seconds
    while time.process_time() - start < seconds:
        order = rng.permutation(len(train))
        for i in range(0, len(order) - batch + 1, batch):
            elapsed = time.process_time() - start
            if elapsed >= seconds:
                break
            # linear warm-up, then a cosine to zero over the wall-time budget
            frac = (elapsed - warmup) / max(seconds - warmup, 1e-9)
            lr = (
                peak * elapsed / warmup
                if elapsed < warmup
                else peak * 0.5 * (1 + math.cos(math.pi * frac))
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[i : i + batch]
            x = aug(images[torch.from_numpy(idx).to(device)], idx, epoch, seed)[0]
            with torch.autocast(
                device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                loss = F.cross_entropy(model(x).float(), labels[torch.from_numpy(idx).to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad or 1e9)
            optimizer.step()
            steps += 1
        epoch += 1
    model.eval()
    view = resolve_view(cfg.data.data, cfg.to_dict())
    hits = n = 0
    with torch.no_grad():
        for x, y in eval_batches(val, view, 512, 0, device):
            hits += int((model(x).argmax(1) == y.to(device)).sum())
            n += y.shape[0]
    return {"top1": 100.0 * hits / n, "steps": steps, "epochs": epoch, "seconds": seconds}


def fmt(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "–"
    if stats.get("n", 1) > 1:
        return f"{stats['mean']:.2f} ± {stats['std']:.2f}"
    return f"{stats['mean']:.2f}"


def finetune_top1(
    run: Path, weights: Path | str, data: str, n: int, seed: int, decay: float, args: Any
) -> float:
    """Top-1 of ``dino finetune`` of ``weights`` (the run's, or ``random`` shaped like it) on
    ``n`` labels per class (0: all) of subset ``seed``, for ``--finetune-seconds`` of CPU time."""
    backbone = load_backbone(weights, like=run if weights == "random" else None, seed=seed)
    with tempfile.TemporaryDirectory() as out:
        res = finetune_backbone(backbone, data, out, time_budget=args.finetune_seconds,
                                lr=args.finetune_lr, layer_decay=decay, labels_per_class=n,
                                label_seed=seed, seed=seed, device=args.device)  # fmt: skip
    return float(res["top1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a `dino train` run folder")
    ap.add_argument("--data", default=None, help="labeled data (default: the run's)")
    ap.add_argument("--labels", type=int, nargs="+", default=[1, 10, 100, 0],
                    help="labeled images per class (0: all)")  # fmt: skip
    ap.add_argument("--label-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--supervised-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--seconds", type=float, default=None,
                    help="CPU time of each supervised run (default: the DINO run's)")  # fmt: skip
    ap.add_argument("--linear-epochs", type=int, default=100)
    ap.add_argument("--linear-lr", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-supervised", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--finetune-seconds", type=float, default=0.0,
                    help="CPU time of each fine-tuning run (0: no fine-tuning rows)")  # fmt: skip
    ap.add_argument("--finetune-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    args = ap.parse_args()

    run = Path(args.run)
    cfg = run_config(run)
    data = args.data or cfg.data.data
    seconds = args.seconds
    if seconds is None:
        done = json.loads((run / "results.json").read_text())
        seconds = float(done.get("train_cpu_seconds", done["train_seconds"]))
    device = resolve_device(args.device)
    train, val = open_labeled(data)
    rows = []
    for n in args.labels:
        seeds = args.label_seeds if n else [0]
        row: dict[str, Any] = {"labels_per_class": n or "all"}
        for name, backbone in (("dino_knn", run), ("pixel_knn", pixels())):
            res = knn_eval(backbone, data, ks=[args.k], labels_per_class=n,
                           label_seeds=seeds, device=args.device)  # fmt: skip
            runs = [r["knn"] for r in res.get("per_seed", [{"knn": res["knn"]}])]
            k = next(iter(res["knn"]))
            row[name] = {**mean_spread([r[k]["top1"] for r in runs]), "n": len(runs), "k": int(k)}
        lin = linear_probe_seeds(run, data, labels_per_class=n, label_seeds=seeds, cached=True,
                                 epochs=args.linear_epochs, lr=args.linear_lr,
                                 device=args.device)  # fmt: skip
        tops = [r["top1"] for r in lin.get("per_seed", [lin])]
        row["dino_linear"] = {**mean_spread(tops), "n": len(tops)}
        if not args.skip_supervised:
            sup = []
            for s in args.supervised_seeds if n else [args.supervised_seeds[0]]:
                subset = labeled_subset(train, n, s) if n else train
                sup.append(supervised(cfg, subset, val, seconds, s, device))
            row["supervised"] = {**mean_spread([r["top1"] for r in sup]), "n": len(sup),
                                 "runs": sup}  # fmt: skip
        if args.finetune_seconds:
            seeds = args.finetune_seeds if n else [args.finetune_seeds[0]]
            for name, weights, decay in (("dino_finetune", run, 0.65),
                                         ("random_finetune", "random", 1.0)):  # fmt: skip
                tops = [finetune_top1(run, weights, data, n, s, decay, args) for s in seeds]
                row[name] = {**mean_spread(tops), "n": len(tops)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    header = (
        "| labels per class | DINO k-NN | DINO linear | supervised from scratch | raw-pixel k-NN |"
    )
    tuned = " DINO + fine-tuning | random init + fine-tuning |" if args.finetune_seconds else ""
    lines = [header + tuned, "| --- | --- | --- | --- | --- |" + " --- | --- |" * bool(tuned)]
    for r in rows:
        lines.append(
            f"| {r['labels_per_class']} | {fmt(r['dino_knn'])} | {fmt(r['dino_linear'])} | "
            f"{fmt(r.get('supervised'))} | {fmt(r['pixel_knn'])} |"
            + (f" {fmt(r['dino_finetune'])} | {fmt(r['random_finetune'])} |" if tuned else "")
        )
    print("\n".join(lines))
    if not args.no_save:
        result = {
            **stamp(device),
            "run": str(run),
            "data": data,
            "supervised_seconds": seconds,
            "label_seeds": args.label_seeds,
            "supervised_seeds": args.supervised_seeds,
            "linear": {"epochs": args.linear_epochs, "lr": args.linear_lr, "cached": True},
            "finetune": {
                "cpu_seconds": args.finetune_seconds,
                "seeds": args.finetune_seeds,
                "lr": args.finetune_lr,
            },  # fmt: skip
            "rows": rows,
            "table": lines,
        }
        path = save_results(machine_name(device), "label_efficiency", data, result)
        print(f"results -> {path}")


if __name__ == "__main__":
    main()
