"""The supervised baseline of the segmentation comparison: the same ViT as a DINO run, trained
with labels (cross-entropy on the object class of the Fashion-MNIST scenes) for the same time.

The network, its initialization (the run's seed), the data (the 60k train scenes), the input
view (the DINO run's first global view: random resized crop, flip, colour jitter, grayscale,
blur, at the run's global size), the batch size, precision, learning rate (scaled alike),
warm-up and cosine schedule are the DINO run's; a linear classifier on [CLS] is added and
trained with it. AdamW, weight decay 0.05 (DeiT's).

"The same time" on a machine shared with other jobs: a DINO step and a supervised step are timed
in this process, taking turns (``harness.interleave``, so a busy period slows both alike), and
the supervised run gets ``DINO steps x (DINO step time / supervised step time)`` steps, i.e. the
wall time of the DINO run on the machine as it would be for both. ``--seconds S`` instead trains
for S seconds of wall time (on a quiet machine).

    python benchmarks/supervised_scenes.py --like /work/runs/scenes-dino \\
        --output /work/runs/scenes-supervised

Writes OUTPUT/backbone.pth (the backbone's state dict, loadable by ``dino segment --weights``),
OUTPUT/log.jsonl (loss every 20 steps) and OUTPUT/result.json (steps, timing, test accuracy of
the classifier), which ``benchmarks/segmentation.py`` copies into its results.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from harness import interleave, stamp
from torch import nn

from dino.config import Config
from dino.config_load import load_config
from dino.data.crop_draws import ViewSpec
from dino.data.datasets import open_training_data
from dino.data.tensor_aug import TensorMultiCrop
from dino.devices import AUTOCAST_DTYPES, resolve_device, resolve_precision
from dino.eval.features import tensor_eval_batches
from dino.models.backbones import build_backbone
from dino.training.trainer import Trainer

#: Weight decay of the supervised run (DeiT's).
WEIGHT_DECAY = 0.05


class Supervised:
    """The ViT of a DINO config with a linear classifier, one AdamW step per call."""

    def __init__(self, cfg: Config, classes: int, device: torch.device, total_steps: int) -> None:
        m, d = cfg.model, cfg.data
        torch.manual_seed(cfg.run.seed)
        self.backbone = build_backbone(m.arch, m.patch_size, d.global_size, m.depth, 0.0)
        self.classifier = nn.Linear(self.backbone.embed_dim, classes)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self.backbone.to(device)
        self.classifier.to(device)
        decay, no_decay = [], []
        for module in (self.backbone, self.classifier):
            for name, p in module.named_parameters():
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay}],
            lr=0.0,
            weight_decay=0.0,
        )
        self.aug = TensorMultiCrop(
            [ViewSpec(d.global_size, tuple(d.global_scale), d.blur_p[0], d.solarize_p[0])],
            d.brightness,
            d.contrast,
            d.saturation,
            d.hue,
            d.color_jitter_p,
            d.grayscale_p,
            tuple(d.blur_sigma),
            tuple(d.mean),
            tuple(d.std),
        )
        self.dtype = AUTOCAST_DTYPES[resolve_precision(cfg.run.precision, device)]
        self.device = device
        self.base_lr = cfg.optim.lr * cfg.optim.batch_size / 256.0
        self.min_lr = cfg.optim.min_lr
        self.clip = cfg.optim.clip_grad
        self.total = max(1, total_steps)
        self.warmup = 0
        self.step_count = 0

    def lr(self, it: int) -> float:
        if it < self.warmup:
            return self.base_lr * it / self.warmup
        t = (it - self.warmup) / max(1, self.total - self.warmup)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, idx: Any, epoch: int) -> float:
        (x,) = self.aug(images, idx, epoch, 0)
        for group in self.opt.param_groups:
            group["lr"] = self.lr(self.step_count)
        autocast = torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None)
        with autocast:
            logits = self.classifier(self.backbone(x))
        loss = F.cross_entropy(logits.float(), labels.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            for module in (self.backbone, self.classifier):
                for p in module.parameters():  # per parameter, as the DINO step clips
                    if p.grad is not None:
                        torch.nn.utils.clip_grad_norm_([p], self.clip)
        self.opt.step()
        self.step_count += 1
        return float(loss.detach())

    @torch.no_grad()
    def accuracy(self, ds: Any, cfg: Config) -> float:
        """Top-1 (%) of the classifier on ``ds`` (the eval view)."""
        self.backbone.eval()
        d = cfg.data
        right = total = 0
        for x, y in tensor_eval_batches(
            ds, d.eval_resize, d.eval_crop, d.mean, d.std, 256, self.device
        ):
            pred = self.classifier(self.backbone(x)).argmax(1).cpu()
            right += int((pred == y.cpu()).sum())
            total += len(y)
        self.backbone.train()
        return 100.0 * right / max(1, total)


def dino_steps(run: Path, cfg: Config) -> int:
    """Iterations the DINO run trained (its last logged iteration + 1, else its schedule)."""
    last = -1
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line).get("iteration", -1)))
            except (ValueError, AttributeError):
                continue
    if last >= 0:
        return last + 1
    return cfg.optim.epochs * (60000 // cfg.optim.batch_size)


def time_steps(config: str, cfg: Config, rounds: int) -> dict[str, Any]:
    """Seconds of a DINO step of the run's ``config`` file and of a supervised step, timed
    taking turns."""
    device = resolve_device(cfg.run.device)
    b = cfg.optim.batch_size
    # the run's config with one batch of data; the trainer's run folder is never written
    small = {"subset": b, "epochs": 10 * rounds, "freeze_last_layer": 0}
    small["output_dir"] = "/nonexistent/benchmark"  # schedules long enough for the rounds
    trainer = Trainer(load_config(config, small))
    trainer.iteration = 1
    sup = Supervised(cfg, 10, device, 1000)
    train = trainer.data.train
    idx = torch.arange(b).numpy()
    imgs = train.images[:b].to(device)
    labels = train.labels[:b]

    def dino() -> None:  # augmentation included, as in the supervised step
        views = trainer.batches.aug(imgs, idx, 0, cfg.run.seed)
        trainer.step(views)
        trainer.iteration += 1

    def supervised() -> None:
        sup(imgs, labels, idx, 0)

    times = interleave({"dino": dino, "supervised": supervised}, rounds, warmup=1, device=device)
    return {
        "dino_step_s": statistics.median(times["dino"]),
        "supervised_step_s": statistics.median(times["supervised"]),
        "dino_steps_s": times["dino"],
        "supervised_steps_s": times["supervised"],
        "foreign_cpu_share": statistics.mean(times["dino:other"] + times["supervised:other"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--like", required=True, help="the DINO run folder (its config.yaml)")
    p.add_argument("--output", required=True, help="a new folder for the supervised backbone")
    p.add_argument("--seconds", type=float, default=None, help="train for this wall time")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds of each step kind")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps")
    p.add_argument("--subset", type=int, default=0, help="first N scenes only (quick trials)")
    args = p.parse_args(argv)

    run = Path(args.like)
    cfg = load_config(str(run / "config.yaml"))
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists and is not empty; choose a new --output", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.run.device)

    timing: dict[str, Any] = {}
    n_dino = dino_steps(run, cfg)
    if args.steps is not None:
        steps = args.steps
    elif args.seconds is not None:
        steps = 10**9  # until the time is up
    else:
        timing = time_steps(str(run / "config.yaml"), cfg, args.rounds)
        steps = round(n_dino * timing["dino_step_s"] / timing["supervised_step_s"])
        print(
            f"DINO step {timing['dino_step_s']:.3f} s, supervised step "
            f"{timing['supervised_step_s']:.3f} s (other jobs used "
            f"{100 * timing['foreign_cpu_share']:.0f}% of the CPU meanwhile): {n_dino} DINO "
            f"steps = {steps} supervised steps",
            flush=True,
        )

    data = open_training_data(cfg.data.data, args.subset)
    train, test = data.train, data.knn_query
    assert train.labels is not None and test is not None
    b = cfg.optim.batch_size
    per_epoch = len(train) // b
    # with --seconds the schedule's length is set from the speed of the first 20 steps
    sup = Supervised(cfg, len(train.classes), device, steps)
    sup.warmup = round(cfg.optim.warmup_epochs * per_epoch)
    images = train.images.to(device)
    start = time.time()
    it = 0
    loss = float("nan")
    log = open(out / "log.jsonl", "w")
    while it < steps:
        epoch = it // per_epoch
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
        for s in range(it % per_epoch, per_epoch):
            if it >= steps:
                break
            idx = order[s * b : (s + 1) * b]
            loss = sup(images[idx.to(device)], train.labels[idx], idx.numpy(), epoch)
            it += 1
            elapsed = time.time() - start
            if args.seconds is not None:
                if it == 20:  # fix the schedule from the measured speed
                    sup.total = max(it + 1, int(args.seconds / (elapsed / it)))
                    steps = sup.total
                if elapsed >= args.seconds:
                    steps = it
            if it % 20 == 0 or it == steps:
                rec = {"iteration": it, "epoch": it / per_epoch, "loss": loss, "lr": sup.lr(it)}
                rec["elapsed_s"] = round(elapsed, 1)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(json.dumps(rec), flush=True)
    log.close()
    wall = time.time() - start
    acc = sup.accuracy(test, cfg)
    torch.save(sup.backbone.state_dict(), out / "backbone.pth")
    result = {
        "like": str(run),
        "dino_steps": n_dino,
        "steps": it,
        "epochs": it / per_epoch,
        "train_wall_s": round(wall, 1),
        "final_loss": loss,
        "test_accuracy": round(acc, 2),
        "timing": timing,
        "stamp": stamp(device),
        "command": " ".join(["python", "benchmarks/supervised_scenes.py", *(argv or sys.argv[1:])]),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"test accuracy {acc:.2f}% after {it} steps ({wall:.0f} s) -> {out / 'backbone.pth'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
