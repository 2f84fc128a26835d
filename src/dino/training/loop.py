"""The training loop: ``train(cfg)`` runs DINO pretraining and returns the final results.

The step itself (``_step``) reads top to bottom: schedules, teacher and student forward, loss,
backward, non-finite check, per-parameter clipping, last-layer freeze, optimizer step, teacher EMA.

Never losing a run:

* a checkpoint every ``--save-every`` iterations and at each epoch end holds everything the next
  step depends on (networks, optimizer, loss scaler, center, iteration; the data order and the
  augmentations are pure functions of (seed, epoch, sample), and torch's generator, which drop
  path draws from, is reseeded from (seed, rank, iteration) at every step), so ``dino train
  --resume RUN_DIR`` after a kill at any moment ends with the weights of an uninterrupted run;
* a step whose loss or gradient is not finite is skipped and logged; ``--max-bad-steps`` in a
  row stop the run, leaving the last checkpoint;
* SIGTERM / SIGINT write a checkpoint and exit with code 128 + signal.

Testing hooks (environment variables read once when a :class:`Trainer` is built; never set them
in real runs):

* ``DINO_TEST_NAN_AT="5"``, ``"5-100"`` or ``"3,7-9"`` makes the loss of those iterations NaN;
  prefix ``grad:`` (``"grad:5"``) to poison a gradient instead.
* ``DINO_TEST_KILL_AT="7"`` SIGKILLs the process right after iteration 7 (when ``iteration`` has
  become 7); ``"7:saved"`` right after the checkpoint of iteration 7 is written; ``"7:saving"``
  in the middle of writing it (the temporary file half written, not yet renamed).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dino.config import Config
from dino.data.datasets import ImageFiles, TensorImages, open_training_data
from dino.data.multicrop import eval_transform
from dino.data.seeding import sample_keys
from dino.errors import DinoError
from dino.eval.features import extract, file_eval_batches, tensor_eval_batches
from dino.eval.neighbors import weighted_knn
from dino.loss import DINOLoss
from dino.models.backbones import has_batchnorm
from dino.models.multicrop import same_size_runs
from dino.training.checkpoint import (
    LATEST,
    BeforeRename,
    atomic_write,
    has_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    save_torch,
    set_rng_state,
)
from dino.training.distributed import (
    all_mean,
    gather_strided,
    inject_fault,
    max_over_ranks,
    replica_spread,
    sync_batchnorm,
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
def clip_per_parameter(
    params: list[torch.Tensor], max_norm: float, norms: list[torch.Tensor] | None = None
) -> None:
    """Scale each parameter's gradient to norm at most ``max_norm`` (the reference's clipping).

    ``norms``: the gradient norms of the parameters that have a gradient, if already computed.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if norms is None:
        norms = torch._foreach_norm(grads)
    scale = torch.clamp(max_norm / (torch.stack(list(norms)) + 1e-6), max=1.0)
    # Only the gradients above the limit are rewritten (one host sync to find them): scaling
    # all of them by mostly 1.0 was a pass over the whole model (benchmarks/step_parts.py).
    clipped = torch.nonzero(scale < 1.0).flatten().tolist()
    if clipped:
        torch._foreach_mul_([grads[i] for i in clipped], list(scale[clipped].unbind()))


class Trainer:
    """Owns one run: networks, optimizer, loss, schedules, data and the run folder."""

    def __init__(self, cfg: Config, resume: str | Path | None = None) -> None:
        self.cfg = cfg
        self.d: Dist = setup_distributed(cfg.run.device)
        self.device = resolve_device(cfg.run.device, self.d)
        self.precision = resolve_precision(cfg.run.precision, self.device)
        self._nan_kind, self._nan_at = _parse_nan_hook(os.environ.get("DINO_TEST_NAN_AT", ""))
        self._kill_at = _parse_kill_hook(os.environ.get("DINO_TEST_KILL_AT", ""))
        resume_state = None
        if resume is not None:
            resume = Path(resume)
            self.run_dir = resume if resume.is_dir() else resume.parent
            if resume.is_dir() and (resume / "config.yaml").exists() and not has_checkpoint(resume):
                log.warning(
                    "%s holds no checkpoint yet (the run stopped before writing one): "
                    "starting it from the beginning",
                    resume,
                )
            else:
                resume_state = load_checkpoint(resume)
            if self.d.main:
                for p in remove_stale_temporaries(self.run_dir):
                    log.info("removed %s, left by a write that was interrupted", p)
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
        self.student, self.teacher = build_networks(cfg, load_init=resume_state is None)
        self.student.to(self.device)
        self.teacher.to(self.device)
        if self.d.world > 1 and has_batchnorm(self.student):  # any BatchNorm, head's included
            self.student = sync_batchnorm(self.student, self.device)  # global-batch statistics
            self.teacher = sync_batchnorm(self.teacher, self.device)
        if cfg.run.compile:  # in place: parameter names (checkpoints) and DDP are unchanged
            self.student.compile()
            self.teacher.compile()
        self.student_ddp: nn.Module = self.student
        if self.d.world > 1:
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self._head_has_bn = has_batchnorm(self.student.head)  # then all views go through together
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.last_layer = [p for p in self.student.head.last_layer.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.student, cfg, self.device)
        self.loss_fn = DINOLoss(
            cfg.model.out_dim, 2, cfg.loss.student_temp, cfg.loss.center_momentum
        ).to(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        self.monitor = CollapseMonitor(cfg.model.out_dim, cfg.optim.batch_size)
        self.iteration = 0
        self.bad_files: list[str] = []
        self.knn_history: list[dict[str, Any]] = []
        self.last_saved: int | None = None
        if resume_state is not None:
            self._load_state(resume_state)
            self.last_saved = self.iteration
        self._stop_signal: int | None = None
        self._log_handler: logging.Handler | None = None

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
            "monitor": self.monitor.state_dict(),
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
        if "monitor" in s:
            self.monitor.load_state_dict(s["monitor"])
        if s.get("world_size", 1) != self.d.world:
            self._adapt_to_world(s)
        elif "rng" in s:
            set_rng_state(s["rng"])
            if self.d.world > 1:
                torch.manual_seed(self.cfg.run.seed * 1000 + self.d.rank + self.iteration)

    def _adapt_to_world(self, s: dict[str, Any]) -> None:
        """Resume a checkpoint written by another number of processes.

        With the same global batch (per-process ``--batch-size`` x processes) nothing changes:
        global batch ``g`` holds the same samples and augmentations whatever the number of
        processes. With another global batch the position in the epoch is converted to the new
        number of steps per epoch (in samples seen), the learning rate follows the new global
        batch, and the data order differs from an uninterrupted run: both are warned about.
        """
        old_world = int(s.get("world_size", 1))
        old_batch = int(
            (s.get("config") or {}).get("optim", {}).get("batch_size", self.cfg.optim.batch_size)
        )
        old_global, new_global = old_world * old_batch, self.batches.sampler.global_batch
        if old_global == new_global:
            log.warning(
                "resuming a run written by %d process(es) with %d: the global batch (%d), the "
                "data order and the augmentations are unchanged; only drop-path randomness "
                "differs from an uninterrupted run",
                old_world,
                self.d.world,
                new_global,
            )
            return
        n = len(self.data.train)
        old_steps = max(1, n // old_global)
        epoch, step = divmod(self.iteration, old_steps)
        converted = epoch * self.steps_per_epoch + min(
            step * old_global // new_global, self.steps_per_epoch - 1
        )
        keep = old_global // self.d.world
        log.warning(
            "resuming a run written by %d process(es) of batch %d (global batch %d) with %d "
            "process(es) of batch %d (global batch %d): the data order from here on differs from "
            "an uninterrupted run, iteration %d becomes %d and the learning rate follows the new "
            "global batch%s",
            old_world,
            old_batch,
            old_global,
            self.d.world,
            self.cfg.optim.batch_size,
            new_global,
            self.iteration,
            converted,
            f"; pass --batch-size {keep} to keep the global batch"
            if keep * self.d.world == old_global
            else "",
        )
        self.iteration = converted

    def save(self) -> None:
        """Write the checkpoint of the current iteration (atomically), the teacher backbone and
        ``bad_files.txt``. Every process calls it."""
        if self.d.world > 1:
            self._merge_bad_files()
            spread = replica_spread(self.teacher)
            if spread > 0:
                log.warning(
                    "the teacher weights differ between processes (parameter sums by up to "
                    "%.3g): every process should hold the same weights; please report this",
                    spread,
                )
        if self.d.main:
            save_checkpoint(self.state(), self.run_dir, self.cfg.run.keep, self._kill_in_write())
            backbone = self.teacher.backbone.state_dict()
            save_torch(backbone, self.run_dir / "teacher_backbone.pth")
            self._write_bad_files()
        self.last_saved = self.iteration
        if self.d.world > 1:
            dist.barrier()
        self._check_bad_fraction()
        self._test_kill("saved")

    def _kill_in_write(self) -> BeforeRename | None:
        """The ``DINO_TEST_KILL_AT=N:saving`` hook for the checkpoint of this iteration."""
        if self._kill_at != (self.iteration, "saving"):
            return None

        def die(f: Any) -> None:
            f.flush()
            f.truncate(max(f.tell() // 2, 1))
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        return die

    def _test_kill(self, point: str) -> None:
        """The ``DINO_TEST_KILL_AT`` hook: SIGKILL this process at iteration N, ``point``."""
        if self._kill_at == (self.iteration, point):
            os.kill(os.getpid(), signal.SIGKILL)

    # ---------------------------------------------------------------- the step
    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    def _view_parts(self, views: list[torch.Tensor]) -> list[tuple[int, int]]:
        """``(first, end)`` of each run of same-sized views; all views at once when the head
        has BatchNorm (its statistics are over all views, as in the reference code)."""
        return [(0, len(views))] if self._head_has_bn else same_size_runs(views)

    def _step(self, views: list[torch.Tensor]) -> dict[str, Any]:
        """One optimization step. Returns its statistics, or ``{"skipped": reason}`` when the
        loss or a gradient was not finite: then nothing changes (weights, optimizer, teacher,
        center), except that an fp16 loss scale is lowered."""
        it, epoch = self.iteration, self.iteration / self.steps_per_epoch
        # drop path draws from torch's generator: seeding it from the iteration makes every step
        # independent of what ran before it (resume, k-NN evaluation, DataLoader start-up)
        torch.manual_seed(_step_seed(self.cfg.run.seed, self.d.rank, it))
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.sched.lr[it])
            if group["apply_wd"]:
                group["weight_decay"] = float(self.sched.wd[it])
        with self._autocast(), torch.no_grad():
            teacher_out = self.teacher(views[:2])
        targets = self.loss_fn.targets(teacher_out, float(self.sched.teacher_temp[it]))
        self.optimizer.zero_grad(set_to_none=True)
        # the student's views one resolution at a time, each part backpropagated before the next
        # part's forward: the loss is a sum over views, and one resolution's activations are
        # alive at a time instead of all of them (DDP averages the gradients on the last part)
        parts = self._view_parts(views)
        loss = torch.zeros((), device=self.device)
        for k, (first, end) in enumerate(parts):
            last = k == len(parts) - 1
            no_sync = getattr(self.student_ddp, "no_sync", None)
            with nullcontext() if last or no_sync is None else no_sync():
                with self._autocast():
                    out = self.student_ddp(views[first:end])
                    part = self.loss_fn.student_term(out, targets, first, len(views))
                if self._nan_kind == "loss" and it in self._nan_at:
                    part = part * float("nan")
                self.scaler.scale(part).backward()
            loss = loss + part.detach()
        stats = targets.stats(loss)
        if self._nan_kind == "grad" and it in self._nan_at:
            next(p for p in self.params if p.grad is not None).grad.fill_(float("nan"))
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16 loss scaling
        grads = [p.grad for p in self.params if p.grad is not None]
        norms = list(torch._foreach_norm(grads)) if grads else []
        loss_finite = torch.isfinite(loss.detach()).all()
        grads_finite = torch.isfinite(torch.stack(norms)).all() if norms else loss_finite
        finite = torch.stack([loss_finite, grads_finite]).to(torch.float32)
        if self.d.world > 1:  # every process must take the same decision
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        loss_ok, grads_ok = (bool(v) for v in finite.tolist())
        if not (loss_ok and grads_ok):
            self.loss_fn.discard_center_update()
            if self.scaler.is_enabled():
                self.scaler.update()  # lowers the loss scale
            self.optimizer.zero_grad(set_to_none=True)
            return {"skipped": "non-finite loss" if not loss_ok else "non-finite gradient"}
        if self.cfg.optim.clip_grad > 0:
            clip_per_parameter(self.params, self.cfg.optim.clip_grad, norms)
        if epoch < self.cfg.optim.freeze_last_layer:
            for p in self.last_layer:
                p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update(self.teacher, self.student, float(self.sched.momentum[it]))
        self.loss_fn.apply_center_update()
        values = [loss.detach(), stats.teacher_entropy, stats.kl]
        if stats.batch_entropy is not None:
            values.append(stats.batch_entropy)
        summary = torch.stack([v.float() for v in values])
        if self.d.world > 1:  # the global batch's statistics, as one process would log them
            summary = all_mean(summary)
        numbers = summary.tolist()
        names = ["loss", "teacher_entropy", "kl", "batch_entropy"]
        return dict(zip(names, numbers, strict=False))

    # ---------------------------------------------------------------- evaluation
    def knn(self) -> dict[str, dict[str, float]] | None:
        """Weighted k-NN of the teacher backbone's features (bank: train, queries: held out).

        Runs with forked random generators, so that it changes nothing of the training."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._knn()

    @torch.no_grad()
    def _knn(self) -> dict[str, dict[str, float]] | None:
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
                    eval_transform(dc.eval_resize, dc.eval_crop, dc.mean, dc.std),
                    files=(
                        ds.files[rank_ids.start :: self.d.world],
                        ds.labels[rank_ids.start :: self.d.world],
                        ds.classes,
                    ),
                )
                batches = file_eval_batches(part, 128, self.batches_workers(), self.device)
            f, y = extract(backbone, batches, self.autocast_dtype, bar.update)
            bar.close()
            feats.append(self._gather(f, y, n))
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

    def _gather(
        self, f: torch.Tensor, y: torch.Tensor, n: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The features and labels of all ``n`` samples on rank 0, in dataset order, as one
        process computes them (rank r holds samples r, r+W, ...); None on the other ranks."""
        if self.d.world == 1:
            return f, y
        return gather_strided(f, n), gather_strided(y, n)

    # ---------------------------------------------------------------- the run
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached this process or, in a multi-process run, any other:
        all processes get the same answer, so they save and exit at the same iteration (a
        process alone in a collective would wait for the others forever)."""
        if self.d.world > 1:
            agreed = max_over_ranks(self._stop_signal or 0, self.device)
            if agreed:
                self._stop_signal = self._stop_signal or agreed
        return self._stop_signal is not None

    def fit(self) -> dict[str, Any]:
        """Train to the last epoch (from the resumed iteration), then evaluate; returns the
        results also written to ``results.json``."""
        cfg, d = self.cfg, self.d
        metrics = None
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(self.run_dir / "config.yaml")
            self._attach_log_file()
            evaluated = {int(h["epoch"]) for h in self.knn_history}
            metrics = _MetricsFile(
                self.run_dir / "metrics.jsonl", self.iteration, evaluated, cfg.run.tensorboard
            )
        try:
            return self._run(metrics)
        finally:
            if metrics is not None:
                metrics.close()
            if self._log_handler is not None:
                logging.getLogger("dino").removeHandler(self._log_handler)
                self._log_handler.close()
                self._log_handler = None

    def _run(self, metrics: _MetricsFile | None) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
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
        bar: tqdm | None = None
        try:
            evaluated = {int(h["epoch"]) for h in self.knn_history}
            if (
                0 < start_epoch < cfg.optim.epochs
                and self.iteration == start_epoch * self.steps_per_epoch
                and self._eval_due(start_epoch)
                and start_epoch not in evaluated
            ):  # the checkpoint was written at an epoch end before its evaluation
                self._eval_and_log(metrics, start_epoch)
                self.save()
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
                    it = self.iteration
                    inject_fault(d.rank, it)
                    out = self._step(views)
                    self.iteration += 1
                    n_last += views[0].shape[0] * d.world
                    self._after_step(it, out, metrics)
                    now = time.time()
                    if "loss" in out and now - t_last > 2.0:
                        bar.set_postfix(
                            loss=f"{out['loss']:.3f}", img_s=f"{n_last / (now - t_last):.0f}"
                        )
                        t_last, n_last = now, 0
                    bar.update(1)
                    self._test_kill("step")
                    if self._stop_requested():
                        raise _Interrupted
                    if (
                        cfg.run.save_every
                        and self.iteration % cfg.run.save_every == 0
                        and self.iteration % self.steps_per_epoch  # the epoch end saves below
                        and not self.monitor.bad_streak  # keep the last good checkpoint
                    ):
                        self.save()
                bar.close()
                last = epoch + 1 == cfg.optim.epochs
                if self._eval_due(epoch + 1) and not last:
                    self._eval_and_log(metrics, epoch + 1)
                if not self.monitor.bad_streak or last:
                    self.save()
                if self._stop_requested():
                    raise _Interrupted
        except _Interrupted:
            log.warning(
                "signal %d received: saving a checkpoint at iteration %d and exiting",
                self._stop_signal,
                self.iteration,
            )
            if self.last_saved != self.iteration:
                self.save()
            log.warning("continue with `dino train --resume %s`", self.run_dir)
            raise SystemExit(128 + (self._stop_signal or 0)) from None
        finally:
            if bar is not None:
                bar.close()
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

    def _eval_due(self, epoch: int) -> bool:
        """Whether the k-NN evaluation runs after ``epoch`` epochs (before the last one)."""
        every = self.cfg.run.eval_every
        return bool(every) and epoch % every == 0

    def _after_step(self, it: int, out: dict[str, Any], metrics: _MetricsFile | None) -> None:
        """Log iteration ``it``, count skipped steps and watch for collapse."""
        cfg = self.cfg
        if "skipped" in out:
            log.warning("iteration %d: %s, step skipped", it, out["skipped"])
            if metrics:
                metrics.write(
                    {"iteration": it, "epoch": it / self.steps_per_epoch, "skipped": out["skipped"]}
                )
            if self.last_saved is None:
                hint = "; no checkpoint was written yet, so start the run again"
            else:
                hint = (
                    f", then continue from the last checkpoint (iteration {self.last_saved}) "
                    f"with `dino train --resume {self.run_dir}` and the changed flags"
                )
            self.monitor.bad_step(it, out["skipped"], cfg.run.max_bad_steps, hint)
            return
        self.monitor.good_step()
        warning = self.monitor.update(out["teacher_entropy"], out["kl"], out.get("batch_entropy"))
        if warning:
            log.warning("iteration %d: %s", it, warning)
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
                    **({"collapse": self.monitor.mode, "warning": warning} if warning else {}),
                }
            )
        if warning and cfg.run.stop_on_collapse:
            kept = (
                "no checkpoint was written yet"
                if self.last_saved is None
                else f"the last checkpoint (iteration {self.last_saved}) is kept"
            )
            raise DinoError(f"{warning}. The run stopped (--stop-on-collapse); {kept}")

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

    # ---------------------------------------------------------------- unreadable images
    def _note_bad(self, bad: list[tuple[str, str]]) -> None:
        """Record the unreadable files of a batch (each was replaced by another image): one
        warning each, listed in ``bad_files.txt``, and stop past ``--max-bad-fraction``."""
        known = set(self.bad_files)
        new = False
        for path, reason in bad:
            if path in known:
                continue
            known.add(path)
            self.bad_files.append(path)
            new = True
            log.warning("unreadable image replaced by another one: %s (%s)", path, reason)
        if new and self.d.world == 1:  # with several processes: merged when saving
            self._write_bad_files()
            self._check_bad_fraction()

    def _merge_bad_files(self) -> None:
        """Every process's unreadable files, on every process (a collective call)."""
        parts: list[Any] = [None] * self.d.world
        dist.all_gather_object(parts, self.bad_files)
        merged = list(dict.fromkeys(p for part in parts for p in part))
        self.bad_files = merged

    def _write_bad_files(self) -> None:
        if self.d.main and self.bad_files:
            text = "".join(f"{p}\n" for p in self.bad_files)
            atomic_write(self.run_dir / "bad_files.txt", lambda f: f.write(text.encode()))

    def _check_bad_fraction(self) -> None:
        n, total = len(self.bad_files), len(self.data.train)
        limit = self.cfg.data.max_bad_fraction
        if n > limit * total:
            raise DinoError(
                f"{n} of the {total} images are unreadable, more than --max-bad-fraction "
                f"{limit:g}; they are listed in {self.run_dir / 'bad_files.txt'}. Remove or fix "
                f"them (`dino check-data {self.cfg.data.data}` finds all of them at once), or "
                "raise --max-bad-fraction to train on the rest"
            )

    def _attach_log_file(self) -> None:
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("dino").addHandler(handler)
        self._log_handler = handler


class _Interrupted(Exception):
    pass


class _MetricsFile:
    """``metrics.jsonl``, one JSON object a line. On resume from iteration R, it keeps the lines
    of the steps before R and the k-NN lines of the evaluations the checkpoint holds, so that the
    resumed run writes the lines of an uninterrupted run.

    With ``tensorboard`` and the tensorboard package installed, every numeric value is also
    written as a TensorBoard scalar (``train/<name>``, ``knn/top1_k<k>``, ``knn/top5_k<k>``) at
    its iteration, in event files beside ``metrics.jsonl``; on resume the events from the
    resumed iteration on are purged, as the lines are."""

    def __init__(
        self, path: Path, resume_iteration: int, evaluated: set[int], tensorboard: bool = False
    ) -> None:
        self.path = path
        self.tb = _tensorboard_writer(path.parent, resume_iteration) if tensorboard else None
        if path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
                if not isinstance(row, dict):
                    continue
                it = row.get("iteration", 0)
                if "knn" in row:
                    if it <= resume_iteration and row.get("epoch") in evaluated:
                        keep.append(line)
                elif it < resume_iteration:
                    keep.append(line)
            text = "".join(f"{line}\n" for line in keep)
            atomic_write(path, lambda f: f.write(text.encode()))
        self.f = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            step = int(row.get("iteration", 0))
            for k, v in row.get("knn", {}).items():
                for metric in ("top1", "top5"):
                    self.tb.add_scalar(f"knn/{metric}_k{k}", v[metric], step)
            for name, value in row.items():
                if name not in ("iteration", "knn", "knn_top1_k20") and _is_number(value):
                    self.tb.add_scalar(f"train/{name}", value, step)
            self.tb.flush()

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensorboard_writer(run_dir: Path, resume_iteration: int) -> Any:
    """A ``SummaryWriter`` into the run folder, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    except Exception as exc:  # installed but broken (e.g. a protobuf it cannot use)
        log.warning("tensorboard cannot be imported (%s): writing metrics.jsonl only", exc)
        return None
    # purge_step drops the events a resumed run is about to write again
    return SummaryWriter(str(run_dir), purge_step=resume_iteration or None)


def _parse_steps(spec: str, var: str) -> set[int]:
    """``"5"``, ``"5-100"``, ``"3,7-9"`` -> the set of iterations."""
    steps: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            steps.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise DinoError(f"{var}={spec!r}: expected iterations like 5, 5-100 or 3,7-9") from None
    return steps


def _parse_nan_hook(value: str) -> tuple[str, set[int]]:
    """``DINO_TEST_NAN_AT``: ``[loss:|grad:]<iterations>``."""
    if not value.strip():
        return "loss", set()
    kind, _, spec = value.rpartition(":")
    kind = kind or "loss"
    if kind not in ("loss", "grad"):
        raise DinoError(f"DINO_TEST_NAN_AT={value!r}: the prefix must be loss: or grad:")
    return kind, _parse_steps(spec, "DINO_TEST_NAN_AT")


def _parse_kill_hook(value: str) -> tuple[int, str] | None:
    """``DINO_TEST_KILL_AT``: ``<iteration>[:step|:saving|:saved]``."""
    if not value.strip():
        return None
    it, _, point = value.partition(":")
    point = point or "step"
    if point not in ("step", "saving", "saved") or not it.strip().isdigit():
        raise DinoError(f"DINO_TEST_KILL_AT={value!r}: expected N, N:step, N:saving or N:saved")
    return int(it), point


_STEP_STREAM = 0x5EED_0001


def _step_seed(seed: int, rank: int, iteration: int) -> int:
    """The seed of torch's generator at ``iteration`` on process ``rank``."""
    key = sample_keys(seed, iteration, np.array([rank]), stream=_STEP_STREAM)[0]
    return int(key >> np.uint64(1))


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Run DINO pretraining as ``cfg`` says (continuing the run folder ``resume`` if given) and
    return the results (final weighted k-NN when the data has labels)."""
    trainer = Trainer(cfg, resume)
    results = trainer.fit()
    trainer.d.close()
    return results
