"""Linear probe of a frozen backbone (docs/recipe.md, "Evaluation protocols").

A linear layer is trained on frozen features: for ViTs the [CLS] tokens of the last ``n`` blocks
(after the final norm) concatenated, optionally with the average-pooled patch tokens of the last
block (the reference uses n = 4 without pooling for ViT-S, n = 1 with pooling for ViT-B); for
convnets the pooled output. SGD with momentum 0.9, learning rate ``0.001 x batch / 256``, no
weight decay, cosine decay per iteration; training views are RandomResizedCrop + flip, eval views
Resize + CenterCrop. The classifier and optimizer are checkpointed atomically after every epoch
and a rerun resumes from there.

``cached=True`` is the fast variant: features of the eval view are extracted once (no
augmentation) and the linear layer trains on them, seconds instead of hours; numbers are a little
lower than the augmented protocol's.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dino.atomic_files import atomic_write, load_torch, save_torch
from dino.data.datasets import loader_workers
from dino.devices import resolve_device
from dino.errors import DinoError
from dino.eval.api import as_backbone, features_of, run_config_of
from dino.eval.labels import check_label_args, labeled_subset, spread_over_seeds
from dino.eval.linear_head import (
    LinearClassifier,
    ProbeFeatures,
    cosine_lr,
    default_probe,
    topk_correct,
)
from dino.eval.views import (
    Data,
    EpochBatches,
    EvalView,
    eval_batches,
    num_classes,
    open_labeled,
    resolve_view,
    train_transform,
    with_transform,
)
from dino.value_checks import check_value

log = logging.getLogger("dino")

CHECKPOINT = "checkpoint.pth"
RESULTS = "results.json"
FEATURE_CACHE = "features.pt"


def linear_probe(
    backbone: nn.Module | str | Path,
    data: str = "fashion-mnist",
    *,
    view: EvalView | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.001,
    n_last_blocks: int | None = None,
    avgpool: bool | None = None,
    cached: bool = False,
    output_dir: str | Path | None = None,
    resume: bool = True,
    val_every: int = 1,
    num_workers: int = 0,
    device: str = "auto",
    seed: int = 0,
    subset: int = 0,
    labels_per_class: int = 0,
    label_seed: int = 0,
) -> dict[str, Any]:
    """Train and evaluate a linear classifier on frozen features; returns the results dict.

    Args:
        backbone: a module or weights for :func:`dino.load_backbone`.
        data: ``fashion-mnist`` or a folder with ``train/`` and ``val/`` class subfolders.
        view: eval view and crop size (default: :func:`dino.eval.views.resolve_view`).
        epochs: training epochs (100 in the paper; the cached variant needs fewer images per
            second of compute, so more epochs are cheap).
        batch_size: images per step.
        lr: learning rate for a batch of 256, scaled linearly with ``batch_size``.
        n_last_blocks, avgpool: the ViT features (default: :func:`default_probe`).
        cached: train on features extracted once without augmentation (fast).
        output_dir: where ``checkpoint.pth``, ``results.json`` (and the feature cache) go; None
            keeps nothing on disk.
        resume: continue from ``output_dir/checkpoint.pth`` when it exists.
        val_every: evaluate every this many epochs (and always at the end).
        num_workers: DataLoader workers (-1: auto).
        device: ``auto``, ``cpu``, ``cuda``.
        seed: seed of the classifier's initialization, data order and augmentations.
        subset: use only the first N images of each split (0: all).
        labels_per_class, label_seed: with N > 0, train on N images of each class drawn with
            ``label_seed`` (:mod:`dino.eval.labels`); 0: the whole train split. Several seeds:
            :func:`linear_probe_seeds`.

    Returns ``{"top1", "top5"}`` of the last epoch (percent) with ``best_top1``, ``history``
    and the setup.
    """
    check_value("epochs", epochs, "[1, inf)")
    check_value("batch_size", batch_size, "[1, inf)")
    check_value("lr", lr, "(0, inf)")
    check_value("val_every", val_every, "[1, inf)")
    dev = resolve_device(device)
    model = as_backbone(backbone, dev)
    view = view or resolve_view(data, run_config_of(model))
    n_default, pool_default = default_probe(model)
    probe = ProbeFeatures(
        model,
        n_last_blocks if n_last_blocks is not None else n_default,
        avgpool if avgpool is not None else pool_default,
    ).to(dev)
    train, val = open_labeled(data, subset)
    if labels_per_class:
        train = labeled_subset(train, labels_per_class, label_seed)
    classes = num_classes(train, val)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    info = getattr(model, "weights_info", None)
    setup = {
        "weights": info.source if info else None,
        "checkpoint_key": info.checkpoint_key if info else None,
        "data": data,
        "subset": subset,
        **(
            {"labels_per_class": labels_per_class, "label_seed": label_seed}
            if labels_per_class
            else {}
        ),
        "view": view.to_dict(),
        "feature_dim": probe.out_dim,
        "num_classes": classes,
        "n_last_blocks": probe.n_last_blocks,
        "avgpool": probe.avgpool,
        "cached": cached,
        "batch_size": batch_size,
        "lr": lr,
    }
    torch.manual_seed(seed)
    classifier = LinearClassifier(probe.out_dim, classes).to(dev)
    peak = lr * batch_size / 256
    optimizer = torch.optim.SGD(classifier.parameters(), lr=peak, momentum=0.9, weight_decay=0)
    start_epoch, history = 0, []
    ckpt = out / CHECKPOINT if out is not None else None
    if ckpt is not None and resume and ckpt.exists():
        start_epoch, history = _resume(ckpt, setup, classifier, optimizer)
        log.info("linear probe: resuming %s at epoch %d", ckpt, start_epoch)

    if cached:
        train_f, train_y, val_f, val_y = _cached_features(
            probe, train, val, view, setup, out, batch_size, num_workers, dev
        )
        steps = -(-len(train_y) // batch_size)
    else:
        steps = -(-len(train) // batch_size)
        train_ds = with_transform(train, train_transform(view), seed)
    total = epochs * steps
    result: dict[str, Any] = {"top1": float("nan"), "top5": float("nan")}
    for epoch in range(start_epoch, epochs):
        classifier.train()
        loss_sum, seen = 0.0, 0
        if cached:
            gen = torch.Generator().manual_seed(seed + epoch)
            order = torch.randperm(len(train_y), generator=gen)
            batches = (
                (train_f[idx].to(dev), train_y[idx].to(dev)) for idx in order.split(batch_size)
            )
        else:
            loader = torch.utils.data.DataLoader(
                train_ds,
                batch_sampler=EpochBatches(len(train), batch_size, epoch, seed),
                num_workers=loader_workers(num_workers),
                pin_memory=dev.type == "cuda",
            )
            batches = ((probe(x.to(dev, non_blocking=True)), y.to(dev)) for x, y, _bad in loader)
        bar = tqdm(
            total=steps,
            desc=f"linear epoch {epoch + 1}/{epochs}",
            leave=False,
            disable=not sys.stderr.isatty(),
        )
        for step, (f, y) in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(peak, epoch * steps + step, total)
            loss = F.cross_entropy(classifier(f), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * y.shape[0]
            seen += y.shape[0]
            bar.update(1)
        bar.close()
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1)}
        if (epoch + 1) % max(val_every, 1) == 0 or epoch + 1 == epochs:
            if cached:
                result = _evaluate_features(classifier, val_f, val_y, dev)
            else:
                result = _evaluate(classifier, probe, val, view, batch_size, num_workers, dev)
            record.update(result)
            log.info(
                "linear probe epoch %d/%d: loss %.4f, top-1 %.2f, top-5 %.2f",
                epoch + 1,
                epochs,
                record["loss"],
                result["top1"],
                result["top5"],
            )
        history.append(record)
        if ckpt is not None:
            save_torch(
                {
                    "classifier": classifier.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "setup": setup,
                },
                ckpt,
            )
    if start_epoch >= epochs:  # already trained: evaluate the saved classifier
        if cached:
            result = _evaluate_features(classifier, val_f, val_y, dev)
        else:
            result = _evaluate(classifier, probe, val, view, batch_size, num_workers, dev)
    scored = [h for h in history if "top1" in h]
    best = max(scored, key=lambda h: h["top1"]) if scored else {"top1": result["top1"], "epoch": 0}
    results = {
        "top1": result["top1"],
        "top5": result["top5"],
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "epochs": epochs,
        "n_train": len(train),
        "n_val": len(val),
        **setup,
        "history": history,
    }
    if out is not None:
        text = json.dumps(results, indent=2)
        atomic_write(out / RESULTS, lambda f: f.write(text.encode()))
    return results


def linear_probe_seeds(
    backbone: nn.Module | str | Path,
    data: str = "fashion-mnist",
    *,
    labels_per_class: int,
    label_seeds: Sequence[int] = (0,),
    output_dir: str | Path | None = None,
    device: str = "auto",
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`linear_probe` on each seed's ``labels_per_class`` labeled images per class, each
    into ``output_dir/label-seed-<seed>`` (all labels, ``labels_per_class`` 0: one
    :func:`linear_probe`); returns the mean ``top1``/``top5`` over the seeds
    with ``top1_std``/``top5_std`` (sample standard deviations) and ``per_seed`` results."""
    seeds = check_label_args(labels_per_class, label_seeds)
    model = as_backbone(backbone, resolve_device(device))
    if not labels_per_class:
        return linear_probe(model, data, output_dir=output_dir, device=device, **kwargs)
    out = Path(output_dir) if output_dir is not None else None
    per_seed = []
    for s in seeds:
        result = linear_probe(
            model,
            data,
            output_dir=out / f"label-seed-{s}" if out is not None else None,
            device=device,
            labels_per_class=labels_per_class,
            label_seed=s,
            **kwargs,
        )
        per_seed.append({"seed": s, **result})
    spread = spread_over_seeds([{"": {m: r[m] for m in ("top1", "top5")}} for r in per_seed])[""]
    results = {
        **spread,
        "labels_per_class": labels_per_class,
        "label_seeds": seeds,
        "n_train": per_seed[0]["n_train"],
        "n_val": per_seed[0]["n_val"],
        "per_seed": per_seed,
    }
    if out is not None:
        text = json.dumps(results, indent=2)
        atomic_write(out / RESULTS, lambda f: f.write(text.encode()))
    return results


def _resume(
    path: Path, setup: dict[str, Any], classifier: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, list[dict[str, Any]]]:
    try:
        state = load_torch(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DinoError(
            f"{path} is not a readable linear-probe checkpoint ({type(exc).__name__}); delete it "
            "or pass --restart"
        ) from None
    saved = state.get("setup", {}) if isinstance(state, dict) else {}
    differ = [k for k in setup if saved.get(k) != setup[k] and k != "weights"]
    if differ:
        raise DinoError(
            f"{path} holds a linear probe with another {differ[0]} ({saved.get(differ[0])!r} vs "
            f"{setup[differ[0]]!r}); pass --restart to start over or choose another --output-dir"
        )
    classifier.load_state_dict(state["classifier"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state.get("history", []))


def _cached_features(
    probe: ProbeFeatures,
    train: Data,
    val: Data,
    view: EvalView,
    setup: dict[str, Any],
    out: Path | None,
    batch_size: int,
    num_workers: int,
    dev: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probe features of both splits (eval view), read from ``out/features.pt`` when that holds
    the same setup, else extracted and saved there."""
    key = {
        k: setup.get(k)
        for k in (
            "weights",
            "checkpoint_key",
            "data",
            "subset",
            "labels_per_class",
            "label_seed",
            "view",
            "feature_dim",
            "n_last_blocks",
            "avgpool",
        )
    }
    cache = out / FEATURE_CACHE if out is not None else None
    if cache is not None and cache.exists():
        try:
            saved = load_torch(cache, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                log.info("linear probe: features from %s", cache)
                return saved["train"][0], saved["train"][1], saved["val"][0], saved["val"][1]
        except Exception:  # a stale or broken cache is rebuilt
            pass
    tf, ty = features_of(probe, train, view, batch_size, num_workers, dev, "probe features train")
    vf, vy = features_of(probe, val, view, batch_size, num_workers, dev, "probe features val")
    ty, vy = ty.long(), vy.long()
    if cache is not None:
        save_torch({"key": key, "train": (tf, ty), "val": (vf, vy)}, cache)
    return tf, ty, vf, vy


@torch.no_grad()
def _evaluate_features(
    classifier: nn.Module, feats: torch.Tensor, labels: torch.Tensor, dev: torch.device
) -> dict[str, float]:
    classifier.eval()
    c1 = c5 = 0
    for f, y in zip(feats.split(4096), labels.split(4096), strict=True):
        a, b = topk_correct(classifier(f.to(dev)), y.to(dev).long())
        c1, c5 = c1 + a, c5 + b
    n = max(len(labels), 1)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


@torch.no_grad()
def _evaluate(
    classifier: nn.Module,
    probe: ProbeFeatures,
    val: Data,
    view: EvalView,
    batch_size: int,
    num_workers: int,
    dev: torch.device,
) -> dict[str, float]:
    classifier.eval()
    c1 = c5 = n = 0
    for x, y in eval_batches(val, view, batch_size, num_workers, dev):
        a, b = topk_correct(classifier(probe(x)), y.to(dev).long())
        c1, c5, n = c1 + a, c5 + b, n + y.shape[0]
    n = max(n, 1)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}
