"""The training loop: ``train(cfg)`` runs DINO pretraining and returns the final results.

The step itself (``_step``) reads top to bottom: schedules, teacher and student forward, loss,
backward, per-parameter clipping, last-layer freeze, optimizer step, teacher EMA.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dino.config import Config
from dino.data.datasets import ImageFiles, TensorImages, open_training_data
from dino.data.multicrop import eval_transform
from dino.errors import DinoError
from dino.eval.features import extract, file_eval_batches, tensor_eval_batches
from dino.eval.neighbors import weighted_knn
from dino.loss import DINOLoss
from dino.models.backbones import is_convnet
from dino.training.checkpoint import (
    LATEST,
    atomic_write,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_torch,
    set_rng_state,
)
from dino.training.monitor import CollapseMonitor
from dino.training.setup import (
    AUTOCAST_DTYPES,
    Batches,
    Dist,
    Schedules,
    build_networks,
    build_optimizer,
    resolve_device,
    resolve_precision,
    setup_distributed,
)

log = logging.getLogger("dino")


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_s`` for every parameter, in one foreach call."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


@torch.no_grad()
def clip_per_parameter(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale each parameter's gradient to norm at most ``max_norm`` (the reference's clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    scale = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scale)


class Trainer:
    """Owns one run: networks, optimizer, loss, schedules, data and the run folder."""

    def __init__(self, cfg: Config, resume: str | Path | None = None) -> None:
        self.cfg = cfg
        self.d: Dist = setup_distributed(cfg.run.device)
        self.device = resolve_device(cfg.run.device, self.d)
        self.precision = resolve_precision(cfg.run.precision, self.device)
        resume_state = None
        if resume is not None:
            resume_state = load_checkpoint(resume)
            self.run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
        else:
            self.run_dir = Path(cfg.run.output_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
            if (self.run_dir / LATEST).exists():
                raise DinoError(
                    f"{self.run_dir} already holds a run; continue it with "
                    f"`dino train --resume {self.run_dir}` or choose another --output-dir"
                )
        torch.manual_seed(cfg.run.seed + self.d.rank)
        data = open_training_data(cfg.data.data, cfg.data.subset)
        self.data = data
        self.batches = Batches(cfg, data.train, self.d, self.device)
        self.steps_per_epoch = self.batches.steps_per_epoch()
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.sched = Schedules.build(cfg, self.steps_per_epoch, self.batches.sampler.global_batch)

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.student, self.teacher = build_networks(cfg)
        self.student.to(self.device)
        self.teacher.to(self.device)
        if self.d.world > 1 and is_convnet(self.student):
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        self.student_ddp: nn.Module = self.student
        if self.d.world > 1:
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.last_layer = [p for p in self.student.head.last_layer.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.student, cfg, self.device)
        self.loss_fn = DINOLoss(
            cfg.model.out_dim, 2, cfg.loss.student_temp, cfg.loss.center_momentum
        ).to(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        self.monitor = CollapseMonitor(cfg.model.out_dim)
        self.iteration = 0
        self.bad_files: list[str] = []
        self.knn_history: list[dict[str, Any]] = []
        if resume_state is not None:
            self._load_state(resume_state)
        self._stop_signal: int | None = None

    # ---------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        self.loss_fn.apply_center_update()
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "dino_loss": self.loss_fn.state_dict(),
            "iteration": self.iteration,
            "epoch": self.iteration // self.steps_per_epoch,
            "world_size": self.d.world,
            "config": self.cfg.to_dict(),
            "rng": rng_state(),
            "bad_files": self.bad_files,
            "knn_history": self.knn_history,
        }

    def _load_state(self, s: dict[str, Any]) -> None:
        try:
            self.student.load_state_dict(s["student"])
            self.teacher.load_state_dict(s["teacher"])
            self.optimizer.load_state_dict(s["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DinoError(
                f"the checkpoint does not match this config ({str(exc).splitlines()[0]}); resume "
                "with the config.yaml of its run folder"
            ) from None
        self.scaler.load_state_dict(s["scaler"])
        self.loss_fn.load_state_dict(s["dino_loss"])
        self.iteration = int(s["iteration"])
        self.bad_files = list(s.get("bad_files", []))
        self.knn_history = list(s.get("knn_history", []))
        if s.get("world_size", 1) != self.d.world:
            log.warning(
                "resuming a run written by %d processes with %d: the data order from here on "
                "differs from an uninterrupted run",
                s.get("world_size", 1),
                self.d.world,
            )
        elif "rng" in s:
            set_rng_state(s["rng"])
            if self.d.world > 1:
                torch.manual_seed(self.cfg.run.seed * 1000 + self.d.rank + self.iteration)

    def save(self) -> None:
        if self.d.main:
            save_checkpoint(self.state(), self.run_dir, self.cfg.run.keep)
            backbone = self.teacher.backbone.state_dict()
            save_torch(backbone, self.run_dir / "teacher_backbone.pth")
            if self.bad_files:
                text = "".join(f"{p}\n" for p in self.bad_files)
                atomic_write(self.run_dir / "bad_files.txt", lambda f: f.write(text.encode()))
        if self.d.world > 1:
            dist.barrier()

    # ---------------------------------------------------------------- the step
    def _step(self, views: list[torch.Tensor]) -> dict[str, float] | None:
        it, epoch = self.iteration, self.iteration / self.steps_per_epoch
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.sched.lr[it])
            if group["apply_wd"]:
                group["weight_decay"] = float(self.sched.wd[it])
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            with torch.no_grad():
                teacher_out = self.teacher(views[:2])
            student_out = self.student_ddp(views)
            loss, stats = self.loss_fn(student_out, teacher_out, float(self.sched.teacher_temp[it]))
        if not torch.isfinite(loss):
            return None
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            clip_per_parameter(self.params, self.cfg.optim.clip_grad)
        if epoch < self.cfg.optim.freeze_last_layer:
            for p in self.last_layer:
                p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update(self.teacher, self.student, float(self.sched.momentum[it]))
        self.loss_fn.apply_center_update()
        return {
            "loss": loss.item(),
            "teacher_entropy": stats.teacher_entropy.item(),
            "kl": stats.kl.item(),
        }

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def knn(self) -> dict[str, dict[str, float]] | None:
        """Weighted k-NN of the teacher backbone's features (bank: train, queries: held out)."""
        bank_ds, query_ds = self.data.knn_bank, self.data.knn_query
        if bank_ds is None or query_ds is None:
            return None
        dc = self.cfg.data
        backbone = self.teacher.backbone
        was_training = backbone.training
        backbone.eval()
        feats = []
        for ds in (bank_ds, query_ds):
            n = len(ds)
            rank_ids = range(self.d.rank, n, self.d.world)
            bar = tqdm(
                total=len(rank_ids),
                desc=f"k-NN features {getattr(ds, 'name', '')}",
                leave=False,
                disable=not self.d.main or not sys.stderr.isatty(),
            )
            if isinstance(ds, TensorImages):
                part = TensorImages(
                    ds.images[rank_ids.start :: self.d.world],
                    None if ds.labels is None else ds.labels[rank_ids.start :: self.d.world],
                    ds.classes,
                    "",
                )
                batches = tensor_eval_batches(
                    part, dc.eval_resize, dc.eval_crop, dc.mean, dc.std, 512, self.device
                )
            else:
                part = ImageFiles(
                    ds.root,
                    eval_transform(dc),
                    files=(
                        ds.files[rank_ids.start :: self.d.world],
                        ds.labels[rank_ids.start :: self.d.world],
                        ds.classes,
                    ),
                )
                batches = file_eval_batches(part, 128, self.batches_workers(), self.device)
            f, y = extract(backbone, batches, self.autocast_dtype, bar.update)
            bar.close()
            feats.append(self._gather(f, y))
        backbone.train(was_training)
        if not self.d.main:
            return None
        (fb, yb), (fq, yq) = feats
        device = self.device
        return weighted_knn(
            fb.to(device),
            yb.to(device),
            fq.to(device),
            yq.to(device),
            self.cfg.run.knn_k,
            self.cfg.run.knn_temp,
            num_classes=len(bank_ds.classes) or None,
        )

    def batches_workers(self) -> int:
        from dino.data.datasets import default_num_workers

        return (
            self.cfg.data.num_workers if self.cfg.data.num_workers >= 0 else default_num_workers()
        )

    def _gather(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' features, in rank-interleaved order (rank r holds samples r, r+W, ...)."""
        if self.d.world == 1:
            return f, y
        parts = [None] * self.d.world
        dist.all_gather_object(parts, (f, y))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # ---------------------------------------------------------------- the run
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def fit(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(self.run_dir / "config.yaml")
            self._attach_log_file()
        metrics = _MetricsFile(self.run_dir / "metrics.jsonl", self.iteration) if d.main else None
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info(
            "training %s on %s: %d images, %d steps/epoch x %d epochs, global batch %d, %s on %s",
            cfg.model.arch,
            cfg.data.data,
            len(self.data.train),
            self.steps_per_epoch,
            cfg.optim.epochs,
            self.batches.sampler.global_batch,
            self.precision,
            self.device,
        )
        start_epoch = self.iteration // self.steps_per_epoch
        t_start = time.time()
        try:
            for epoch in range(start_epoch, cfg.optim.epochs):
                start = self.iteration - epoch * self.steps_per_epoch
                bar = tqdm(
                    total=self.steps_per_epoch,
                    initial=start,
                    desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                    disable=not d.main,
                    dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0,
                )
                t_last, n_last = time.time(), 0
                for views, bad in self.batches.epoch(epoch, start):
                    self._note_bad(bad)
                    out = self._step(views)
                    it = self.iteration
                    self.iteration += 1
                    n_last += views[0].shape[0] * d.world
                    if out is None:
                        self.monitor.bad_step(it, self.cfg)
                        log.warning("iteration %d: non-finite loss, step skipped", it)
                        if metrics:
                            metrics.write({"iteration": it, "skipped": "non-finite loss"})
                    else:
                        self.monitor.good_step()
                        warning = self.monitor.update(out["teacher_entropy"], out["kl"])
                        if warning:
                            log.warning(warning)
                        if metrics and (it % cfg.run.log_every == 0 or warning):
                            metrics.write(
                                {
                                    "iteration": it,
                                    "epoch": it / self.steps_per_epoch,
                                    **out,
                                    "lr": float(self.sched.lr[it]),
                                    "wd": float(self.sched.wd[it]),
                                    "momentum": float(self.sched.momentum[it]),
                                    "teacher_temp": float(self.sched.teacher_temp[it]),
                                    **({"collapse": self.monitor.mode} if warning else {}),
                                }
                            )
                        now = time.time()
                        if now - t_last > 2.0:
                            bar.set_postfix(
                                loss=f"{out['loss']:.3f}", img_s=f"{n_last / (now - t_last):.0f}"
                            )
                            t_last, n_last = now, 0
                    bar.update(1)
                    if self._stop_signal is not None:
                        raise _Interrupted
                    if cfg.run.save_every and self.iteration % cfg.run.save_every == 0:
                        self.save()
                bar.close()
                last = epoch + 1 == cfg.optim.epochs
                if cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0 and not last:
                    self._eval_and_log(metrics, epoch + 1)
                self.save()
        except _Interrupted:
            log.warning(
                "signal %d received: saving a checkpoint at iteration %d and exiting",
                self._stop_signal,
                self.iteration,
            )
            self.save()
            raise SystemExit(128 + (self._stop_signal or 0)) from None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        results: dict[str, Any] = {
            "iterations": self.iteration,
            "train_seconds": time.time() - t_start,
        }
        knn = self._eval_and_log(metrics, cfg.optim.epochs)
        if d.main:
            results["knn"] = knn
            results["knn_history"] = self.knn_history
            results["bad_files"] = len(self.bad_files)
            text = json.dumps(results, indent=2)
            atomic_write(self.run_dir / "results.json", lambda f: f.write(text.encode()))
            log.info("run folder: %s", self.run_dir)
        return results

    def _eval_and_log(self, metrics: _MetricsFile | None, epoch: int) -> dict | None:
        t0 = time.time()
        knn = self.knn()
        if knn is None:
            return None
        k20 = knn.get("20") or next(iter(knn.values()))
        log.info(
            "epoch %d: weighted k-NN %s (%.0f s)",
            epoch,
            "  ".join(f"k={k}: top1 {v['top1']:.2f} top5 {v['top5']:.2f}" for k, v in knn.items()),
            time.time() - t0,
        )
        self.knn_history.append({"epoch": epoch, "iteration": self.iteration, "knn": knn})
        if metrics:
            metrics.write(
                {
                    "iteration": self.iteration,
                    "epoch": epoch,
                    "knn": knn,
                    "knn_top1_k20": k20["top1"],
                }
            )
        return knn

    def _note_bad(self, bad: list[str]) -> None:
        if not bad:
            return
        new = [p for p in bad if p not in self.bad_files]
        for p in new:
            log.warning("unreadable image skipped and replaced: %s", p)
        self.bad_files += new
        limit = self.cfg.data.max_bad_fraction * len(self.data.train)
        if len(self.bad_files) > limit:
            raise DinoError(
                f"{len(self.bad_files)} unreadable images (more than "
                f"{100 * self.cfg.data.max_bad_fraction:g}% of the data); see "
                f"{self.run_dir / 'bad_files.txt'} and run `dino check-data` on the folder"
            )

    def _attach_log_file(self) -> None:
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("dino").addHandler(handler)


class _Interrupted(Exception):
    pass


class _MetricsFile:
    """``metrics.jsonl``, one JSON object a line; on resume, lines past the checkpoint go."""

    def __init__(self, path: Path, resume_iteration: int) -> None:
        self.path = path
        if path.exists() and resume_iteration >= 0:
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("iteration", 0) < resume_iteration:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue
            path.write_text("".join(f"{line}\n" for line in keep))
        self.f = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Run DINO pretraining as ``cfg`` says (continuing the run folder ``resume`` if given) and
    return the results (final weighted k-NN when the data has labels)."""
    return Trainer(cfg, resume).fit()
