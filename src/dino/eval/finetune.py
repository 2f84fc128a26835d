"""Supervised fine-tuning of a pretrained backbone with a linear head: the field's recipe for ViTs
(BEiT, MAE, DINOv2): AdamW, layer-wise learning-rate decay, linear warm-up then cosine decay,
label smoothing, stochastic depth (drop path) and RandAugment on random resized crops.

Every parameter trains. With layer-wise decay ``d`` the learning rate of ViT block ``i`` (of
``L``) is ``lr * d ** (L - i)``; the patch embedding, [CLS] and positions get ``d ** (L + 1)``,
the final norm and the head the full rate: the early layers, whose features transfer best, move
least. Biases, norms and tokens have no weight decay.

Training lasts ``epochs`` epochs, or, with ``time_budget``, until this process has used that
many seconds of CPU time (the schedule then runs on the fraction of the budget spent), so that
two starting points compare at equal compute on a shared machine. A checkpoint is written
atomically after every epoch (and when the budget runs out); ``resume=True`` continues it.

The result is a classifier file (``classifier.pth``): the backbone with its head, the class
names and the input it was trained on, which ``dino classify`` uses without a bank and every
eval command loads as a backbone.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from dino.atomic_files import save_torch
from dino.data.datasets import loader_workers
from dino.devices import resolve_device
from dino.errors import DinoError
from dino.eval.api import as_backbone, run_config_of
from dino.eval.classify import CLASSIFIER_KIND, input_of
from dino.eval.labels import labeled_subset, labels_array
from dino.eval.linear_head import is_vit, topk_correct
from dino.eval.outputs import write_json
from dino.eval.views import (
    Data,
    EpochBatches,
    EvalView,
    eval_batches,
    num_classes,
    open_labeled,
    resolve_view,
    with_transform,
)
from dino.value_checks import check_value

log = logging.getLogger("dino")

CHECKPOINT = "checkpoint.pth"
CLASSIFIER = "classifier.pth"
RESULTS = "results.json"


class Classifier(nn.Module):
    """A backbone and a linear head on its [CLS] (or pooled) feature."""

    def __init__(self, backbone: nn.Module, classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.embed_dim), classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly to ``rate`` at the last ViT block (no-op elsewhere)."""
    if not is_vit(backbone):
        return
    depth = len(backbone.blocks)
    for i, block in enumerate(backbone.blocks):
        r = rate * i / max(depth - 1, 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(r) if r > 0 else nn.Identity())


def layer_of(name: str, depth: int) -> int:
    """The layer index of a parameter for layer-wise decay: 0 for the embeddings, ``i + 1`` for
    block ``i``, ``depth + 1`` for the rest (final norm, head)."""
    parts = name.split(".")
    if parts[0] == "backbone" and len(parts) > 1:
        if parts[1] in ("cls_token", "pos_embed", "patch_embed", "reg_token"):
            return 0
        if parts[1] == "blocks":
            return int(parts[2]) + 1
    return depth + 1


def param_groups(
    model: Classifier, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: one per (layer, decayed or not), each with its ``lr_scale``."""
    depth = len(model.backbone.blocks) if is_vit(model.backbone) else 0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        layer = layer_of(name, depth)
        decay = p.ndim > 1 and not name.endswith(("cls_token", "pos_embed", "reg_token"))
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - layer),
            },
        )
        group["params"].append(p)
    return list(groups.values())


def schedule(peak: float, progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to 0."""
    if progress < warmup:
        return peak * progress / warmup
    t = (progress - warmup) / max(1.0 - warmup, 1e-8)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(t, 1.0)))


def finetune_transform(view: EvalView, randaugment: int = 9) -> v2.Compose:
    """Random resized crop (bicubic), flip and RandAugment (2 ops of magnitude ``randaugment``
    out of 30; 0: none), normalized."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                view.crop, scale=(0.25, 1.0), interpolation=InterpolationMode.BICUBIC
            ),
            v2.RandomHorizontalFlip(),
            *([v2.RandAugment(num_ops=2, magnitude=randaugment)] if randaugment else []),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(view.mean, view.std),
        ]
    )


def few_labels(train: Data, per_class: int, seed: int) -> Data:
    """``per_class`` seeded images of each class; a class with fewer is a user error."""
    if not per_class:
        return train
    counts = np.bincount(labels_array(train), minlength=len(train.classes))
    if per_class > counts.min():
        smallest = int(counts.argmin())
        name = train.classes[smallest] if train.classes else str(smallest)
        raise DinoError(
            f"--labels-per-class {per_class} is more than class {name} has ({counts.min()} "
            f"images); pass at most {counts.min()}, or 0 for all labels"
        )
    return labeled_subset(train, per_class, seed)


def classifier_config(model: nn.Module, view: EvalView, data: str) -> dict[str, Any]:
    """The run-config-like record a classifier file carries, so that every command builds its
    backbone and eval view from it (:func:`dino.models.weights.load_backbone`)."""
    info = getattr(model, "weights_info", None)
    run = run_config_of(model) or {}
    m = dict(run.get("model") or {})
    if info is not None:
        m.update(arch=info.arch, patch_size=info.patch_size, depth=info.depth)
    d = dict(run.get("data") or {})
    d.update(data=data, eval_resize=view.resize, eval_crop=view.crop, mean=view.mean, std=view.std)
    if info is not None and info.img_size:
        d.setdefault("global_size", info.img_size)
    return {"model": m, "data": d}


def finetune_backbone(
    backbone: nn.Module | str | Path,
    data: str = "fashion-mnist",
    output_dir: str | Path = "finetune",
    *,
    view: EvalView | None = None,
    epochs: int = 10,
    time_budget: float = 0.0,
    batch_size: int = 64,
    lr: float = 1e-3,
    layer_decay: float = 0.65,
    weight_decay: float = 0.05,
    drop_path: float = 0.1,
    label_smoothing: float = 0.1,
    warmup: float = 0.1,
    randaugment: int = 9,
    labels_per_class: int = 0,
    label_seed: int = 0,
    resume: bool = False,
    subset: int = 0,
    num_workers: int = 0,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tune ``backbone`` with a new linear head on the labeled ``data``; returns (and writes
    to ``output_dir/results.json``) top-1/top-5 on its val split in percent.

    Args:
        backbone: a module or weights for :func:`dino.load_backbone` (``random`` networks come
            from the CLI's ``--weights random --arch``: the from-scratch baseline).
        data: ``fashion-mnist`` or a folder with ``train/`` and ``val/`` class subfolders.
        output_dir: ``checkpoint.pth``, ``classifier.pth`` and ``results.json`` go here; it must
            hold no earlier fine-tuning unless ``resume``.
        view: the eval view; training crops are ``view.crop`` px.
        epochs: training epochs (ignored with ``time_budget``).
        time_budget: > 0: train until this process has used this many CPU seconds.
        batch_size: images per step.
        lr: peak learning rate for a batch of 256, scaled with ``batch_size``.
        layer_decay: layer-wise decay of the learning rate (1: none).
        weight_decay, drop_path, label_smoothing: regularization.
        warmup: the fraction of training spent warming the learning rate up.
        randaugment: RandAugment's magnitude (0-30; 0: crops and flips only).
        labels_per_class, label_seed: train on N seeded images per class (0: all).
        resume: continue from ``output_dir/checkpoint.pth``.
        subset: only the first N images of each split (0: all).
        num_workers, device, seed: loading workers (-1: auto), device, and seed.
    """
    for name, value, valid in (
        ("lr", lr, "(0, inf)"),
        ("time_budget", time_budget, "[0, inf)"),
        ("epochs", epochs, "[1, inf)"),
        ("layer_decay", layer_decay, "(0, 1]"),
        ("drop_path", drop_path, "[0, 1)"),
        ("warmup", warmup, "[0, 1)"),
        ("randaugment", randaugment, "[0, 30]"),
        ("labels_per_class", labels_per_class, "[0, inf)"),
    ):
        check_value(f"--{name.replace('_', '-')}", value, valid)
    out = Path(output_dir)
    ckpt = out / CHECKPOINT
    if resume and not ckpt.is_file():
        raise DinoError(f"--resume: {out} holds no {CHECKPOINT}; drop --resume to start")
    if not resume and any((out / n).exists() for n in (CHECKPOINT, CLASSIFIER, RESULTS)):
        raise DinoError(
            f"{out} already holds a fine-tuning; pass --resume to continue it, or choose another "
            "--output-dir"
        )
    dev = resolve_device(device)
    model_in = as_backbone(backbone, dev)
    view = view or resolve_view(data, run_config_of(model_in))
    train, val = open_labeled(data, subset)
    train = few_labels(train, labels_per_class, label_seed)
    classes = num_classes(train, val)
    names = list(train.classes) or [str(c) for c in range(classes)]
    setup = {
        "weights": getattr(getattr(model_in, "weights_info", None), "source", None),
        "data": data,
        "subset": subset,
        "labels_per_class": labels_per_class,
        "label_seed": label_seed,
        "view": view.to_dict(),
        **dict(epochs=epochs, time_budget=time_budget, batch_size=batch_size, lr=lr),
        **dict(layer_decay=layer_decay, weight_decay=weight_decay, drop_path=drop_path),
        **dict(label_smoothing=label_smoothing, warmup=warmup, randaugment=randaugment, seed=seed),
    }
    expected = input_of(train)
    record = {"kind": CLASSIFIER_KIND, "classes": names, "input": expected}
    record["config"] = classifier_config(model_in, view, data)
    torch.manual_seed(seed)
    set_drop_path(model_in, drop_path)
    model = Classifier(model_in.requires_grad_(True), classes).to(dev).train()
    peak = lr * batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=peak)
    state = {"epoch": 0, "step": 0, "used": 0.0, "history": []}
    if resume:
        state = load_checkpoint(ckpt, setup, model, optimizer)
        log.info("finetune: resuming %s at epoch %d", ckpt, state["epoch"])
    out.mkdir(parents=True, exist_ok=True)
    steps = -(-len(train) // batch_size)
    total = epochs * steps
    dataset = with_transform(train, finetune_transform(view, randaugment), seed)

    def progress() -> float:
        return state["used"] / time_budget if time_budget else state["step"] / total

    def save() -> None:
        save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "setup": setup, **state}, ckpt)  # fmt: skip

    while progress() < 1.0:
        epoch = state["epoch"]
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=EpochBatches(len(train), batch_size, epoch, seed),
            num_workers=loader_workers(num_workers),
        )
        model.train()
        loss_sum = seen = 0
        bar = tqdm(total=steps, desc=f"finetune epoch {epoch + 1}", leave=False,
                   disable=not sys.stderr.isatty())  # fmt: skip
        for x, y, _bad in loader:
            started = time.process_time()
            lr_now = schedule(peak, progress(), warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr_now * group["lr_scale"]
            y = y.to(dev)
            loss = F.cross_entropy(model(x.to(dev)), y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
            state["step"] += 1
            state["used"] += time.process_time() - started
            bar.update(1)
            if progress() >= 1.0:
                break
        bar.close()
        state["epoch"] += 1
        state["history"].append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1)})
        log.info("finetune epoch %d: loss %.4f", epoch + 1, loss_sum / max(seen, 1))
        save()
    result = evaluate(model, val, view, batch_size, num_workers, dev)
    record["model"] = {k: v.cpu() for k, v in model.state_dict().items()}
    save_torch(record, out / CLASSIFIER)
    results = {
        **result,
        "epochs_run": state["epoch"],
        "steps": state["step"],
        "cpu_seconds": state["used"],
        "n_train": len(train),
        "n_val": len(val),
        "classes": names,
        **setup,
        "history": state["history"],
    }
    write_json(out / RESULTS, results)
    return results


@torch.no_grad()
def evaluate(
    model: nn.Module, val: Data, view: EvalView, batch_size: int, num_workers: int, dev: Any
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) on ``val``'s eval views."""
    model.eval()
    c1 = c5 = n = 0
    for x, y in eval_batches(val, view, batch_size, num_workers, dev):
        a, b = topk_correct(model(x), y.to(dev).long())
        c1, c5, n = c1 + a, c5 + b, n + y.shape[0]
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1)}


def load_checkpoint(
    path: Path, setup: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load a fine-tuning checkpoint of the same setup; returns its progress counters."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DinoError(
            f"{path} is not a readable fine-tuning checkpoint ({type(exc).__name__}); delete it "
            "or choose another --output-dir"
        ) from None
    differ = [k for k in setup if k != "weights" and saved["setup"].get(k) != setup[k]]
    if differ:
        raise DinoError(
            f"{path} holds a fine-tuning with another {differ[0]} "
            f"({saved['setup'].get(differ[0])!r} vs {setup[differ[0]]!r}); pass the same flags, "
            "or choose another --output-dir"
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return {k: saved[k] for k in ("epoch", "step", "used", "history")}
