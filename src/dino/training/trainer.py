"""The trainer: ``train(cfg)`` builds a run (networks, optimizer, loss, schedules, data, run
folder), runs its epochs of :func:`~dino.training.step.train_step`, evaluates and returns the
results.

Never losing a run:

* a checkpoint every ``--save-every`` iterations and at each epoch end holds everything the next
  step depends on (:mod:`dino.training.run_state`), so ``dino train --resume RUN_DIR`` after a
  kill at any moment ends with the weights of an uninterrupted run;
* a step whose loss or gradient is not finite is skipped and logged; ``--max-bad-steps`` in a
  row stop the run, leaving the last checkpoint;
* SIGTERM / SIGINT write a checkpoint and exit with code 128 + signal.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dino.atomic_files import atomic_write
from dino.config import Config
from dino.data.datasets import open_training_data
from dino.devices import AUTOCAST_DTYPES, resolve_device, resolve_precision
from dino.errors import DinoError
from dino.loss import DINOLoss
from dino.models.backbones import has_batchnorm
from dino.training import run_lock, run_state
from dino.training.additions import Additions
from dino.training.bad_files import BadFiles
from dino.training.batches import Batches
from dino.training.distributed import Dist, max_over_ranks, setup_distributed, sync_batchnorm
from dino.training.init_from import against_start, init_head_and_center, log_start
from dino.training.knn import teacher_knn
from dino.training.memory import check_memory
from dino.training.metrics import MetricsFile
from dino.training.monitor import CollapseMonitor
from dino.training.networks import build_networks
from dino.training.optim import build_optimizer
from dino.training.schedules import Schedules, stretch_to_min_steps, warn_if_too_short
from dino.training.step import train_step

log = logging.getLogger("dino")


class Trainer:
    """Owns one run: networks, optimizer, loss, schedules, data and the run folder."""

    def __init__(self, cfg: Config, resume: str | Path | None = None) -> None:
        self.cfg = cfg
        self.d: Dist = setup_distributed(cfg.run.device)
        self.device = resolve_device(cfg.run.device, self.d.world, self.d.local_rank)
        self.precision = resolve_precision(cfg.run.precision, self.device)
        self.run_dir, resume_state = run_state.open_run_dir(cfg, resume, self.d.world, self.d.main)
        if self.d.world > 1:  # every process checked the folder before rank 0 writes to it
            dist.barrier()
        torch.manual_seed(cfg.run.seed + self.d.rank)
        # a folder's file list is cached beside it, or in the run folder (read-only parent)
        self.data = open_training_data(cfg.data.data, cfg.data.subset, self.run_dir)
        self.batches = Batches(cfg, self.data.train, self.d, self.device)
        self.steps_per_epoch = self.batches.steps_per_epoch()
        # a small dataset's epochs are few steps: the run grows to --min-steps (the config
        # written to the run folder says so), and a run still too short to learn is warned about
        self.cfg = cfg = stretch_to_min_steps(cfg, self.steps_per_epoch)[0]
        global_batch = self.batches.sampler.global_batch
        warn_if_too_short(cfg, self.steps_per_epoch, len(self.data.train), global_batch)
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.sched = Schedules.build(cfg, self.steps_per_epoch, self.batches.sampler.global_batch)

        check_memory(cfg, self.device, len(self.data.train))  # before allocating the networks
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
        self.head_has_bn = has_batchnorm(self.student.head)  # then all views go through together
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        heads = [h for h in (self.student.head, self.student.patch_head) if h is not None]
        self.last_layer = [p for h in heads for p in h.last_layer.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.student, cfg, self.device)
        self.loss_fn = DINOLoss(
            cfg.model.out_dim,
            2,
            cfg.loss.student_temp,
            cfg.loss.center_momentum,
            cfg.loss.centering,
        ).to(self.device)
        if resume_state is None:  # continued pretraining (--init): DINO head and loss center
            init_head_and_center(self.student, self.teacher, self.loss_fn, cfg.model)
        self.knn_start: dict[str, Any] | None = None  # k-NN of the --init weights
        self.additions = Additions(cfg, self.d.rank, self.device)  # DINOv2's KoLeo and iBOT
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        self.monitor = CollapseMonitor(cfg.model.out_dim, cfg.optim.batch_size)
        self.iteration = 0
        self.bad_files = BadFiles(
            self.run_dir, cfg.data.data, len(self.data.train), cfg.data.max_bad_fraction, self.d
        )
        self.knn_history: list[dict[str, Any]] = []
        self.last_saved: int | None = None
        source = Path(resume) if resume is not None else None
        source = source if source is None or source.is_dir() else source.parent
        self.resumed_in_place = source is not None and source.resolve() == self.run_dir.resolve()
        if resume_state is not None:
            run_state.load_state_dict(self, resume_state)
            self.last_saved = self.iteration
            self._check_work_left(resume)
        self.steps_run = self.good_steps = 0  # in this process's session
        self._stop_signal: int | None = None
        self._log_handler: logging.Handler | None = None

    def _check_work_left(self, resume: str | Path | None) -> None:
        """Refuse to resume a run that is already complete (its results are written), or to
        continue a checkpoint into a new folder with no more iterations to train."""
        if self.iteration < self.total_steps:
            return
        epochs = self.iteration / self.steps_per_epoch
        if (self.run_dir / "results.json").exists():
            raise DinoError(
                f"{self.run_dir} is complete ({self.iteration} iterations, {epochs:g} epochs, "
                "results.json written): nothing to resume; evaluate it with `dino knn` or "
                "`dino linear`, or train it further into a new folder with "
                f"`dino train --resume {resume} --epochs MORE --output-dir NEW`"
            )
        if not self.resumed_in_place:  # continued into a new folder
            raise DinoError(
                f"--epochs {self.cfg.optim.epochs} leaves nothing to train: the checkpoint is at "
                f"iteration {self.iteration} ({epochs:g} epochs); pass more --epochs"
            )

    def state(self) -> dict[str, Any]:
        """The checkpoint of the current iteration (:func:`run_state.state_dict`)."""
        return run_state.state_dict(self)

    def save(self) -> None:
        """Write the checkpoint of the current iteration (:func:`run_state.save`)."""
        run_state.save(self)

    def autocast(self) -> torch.autocast:
        """The run's mixed precision (a no-op in fp32)."""
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    def knn(self) -> dict[str, dict[str, float]] | None:
        """Weighted k-NN of the teacher backbone's features (bank: train, queries: held out)."""
        return teacher_knn(
            self.teacher.backbone, self.data, self.cfg, self.d, self.device, self.autocast_dtype
        )

    # ---------------------------------------------------------------- stopping
    def request_stop(self, signum: int, _frame: Any = None) -> None:
        """Ask the run to save a checkpoint after the current step and exit with code
        128 + ``signum`` (the SIGTERM and SIGINT handler)."""
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

    # ---------------------------------------------------------------- the run
    def fit(self) -> dict[str, Any]:
        """Train to the last epoch (from the resumed iteration), then evaluate; returns the
        results also written to ``results.json``."""
        cfg, d = self.cfg, self.d
        metrics = None
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not (self.run_dir / "config.yaml").exists():  # written once, when the run starts
                cfg.save_yaml(self.run_dir / "config.yaml")
            self._attach_log_file()
            evaluated = {int(h["epoch"]) for h in self.knn_history}
            metrics = MetricsFile(
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

    def _run(self, metrics: MetricsFile | None) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
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
        t_start, cpu_start = time.time(), time.process_time()
        bar: tqdm | None = None
        try:
            if cfg.model.init and self.iteration == 0 and self.knn_start is None:
                self.knn_start = log_start(self.knn(), metrics)
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
                for views, bad in self._batches(epoch, start):
                    self.bad_files.note(bad)
                    it = self.iteration
                    out = train_step(self, views)
                    self.iteration += 1
                    self.steps_run += 1
                    self.good_steps += "skipped" not in out
                    n_last += views[0].shape[0] * d.world
                    self._after_step(it, out, metrics)
                    now = time.time()
                    if "loss" in out and now - t_last > 2.0:
                        bar.set_postfix(
                            loss=f"{out['loss']:.3f}", img_s=f"{n_last / (now - t_last):.0f}"
                        )
                        t_last, n_last = now, 0
                    bar.update(1)
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
                if last and self.steps_run and not self.good_steps:
                    raise DinoError(self._no_update_message())
                if self._eval_due(epoch + 1) and not last:
                    self._eval_and_log(metrics, epoch + 1)
                if not self.monitor.bad_streak or last:
                    self.save()
                if self._stop_requested():
                    raise _Interrupted
        except RuntimeError as exc:
            if self._stop_signal is None or "DataLoader worker" not in str(exc):
                raise
            # the signal also reached a DataLoader worker that was starting, and torch reported
            # it in the middle of a step: that step's state is not known to be whole
            log.warning(
                "signal %d received while the data loader's workers stopped: keeping %s",
                self._stop_signal,
                "no checkpoint (none was written yet)"
                if self.last_saved is None
                else f"the last checkpoint (iteration {self.last_saved})",
            )
            log.warning("continue with `dino train --resume %s`", self.run_dir)
            raise SystemExit(128 + self._stop_signal) from None
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
            # this process's CPU time (all its threads): the cost on a machine shared with others
            "train_cpu_seconds": time.process_time() - cpu_start,
        }
        knn = self._eval_and_log(metrics, cfg.optim.epochs)
        if d.main:
            results["knn"] = knn
            results["knn_history"] = self.knn_history
            results["knn_start"] = self.knn_start  # of the --init weights (None without)
            results["bad_files"] = len(self.bad_files.paths)
            text = json.dumps(results, indent=2)
            atomic_write(self.run_dir / "results.json", lambda f: f.write(text.encode()))
            log.info("run folder: %s", self.run_dir)
        return results

    def _no_update_message(self) -> str:
        """Why a run whose steps were all skipped (non-finite) ends without results."""
        kept = (
            "no checkpoint was written"
            if self.last_saved is None
            else f"the last checkpoint (iteration {self.last_saved}) is kept"
        )
        return (
            f"all {self.steps_run} steps of this run had a non-finite loss or gradient and were "
            f"skipped: nothing was trained, so no results are written ({kept}); lower --lr, use "
            "--precision fp32 or lower --teacher-temp and start again"
        )

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[list[torch.Tensor], list[str]]]:
        """The batches of ``epoch`` from step ``start``; a stop signal that also ended the
        DataLoader's workers (sent to the whole process group) stops the run cleanly at the
        current iteration instead of failing."""
        batches = self.batches.epoch(epoch, start)
        while True:
            try:
                item = next(batches)
            except StopIteration:
                return
            except RuntimeError as exc:
                if self._stop_signal is None or "DataLoader worker" not in str(exc):
                    raise
                raise _Interrupted from None
            yield item

    def _eval_due(self, epoch: int) -> bool:
        """Whether the k-NN evaluation runs after ``epoch`` epochs (before the last one)."""
        every = self.cfg.run.eval_every
        return bool(every) and epoch % every == 0

    def _after_step(self, it: int, out: dict[str, Any], metrics: MetricsFile | None) -> None:
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
                    f"with `dino train --resume {self.run_dir}`, the changed flags and "
                    "--output-dir NEW"
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

    def _eval_and_log(self, metrics: MetricsFile | None, epoch: int) -> dict | None:
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
                    **against_start(knn, self.knn_start),
                }
            )
        return knn

    def _attach_log_file(self) -> None:
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("dino").addHandler(handler)
        self._log_handler = handler


class _Interrupted(Exception):
    pass


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Run DINO pretraining as ``cfg`` says (continuing the run folder ``resume`` if given) and
    return the results (final weighted k-NN when the data has labels)."""
    with run_lock.run_session() as session:  # the run folder's lock, released at the end
        trainer = Trainer(cfg, resume)
        session.started()
        results = trainer.fit()
        trainer.d.close()
    return results
