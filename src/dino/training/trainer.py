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
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

import dino.training.run_lock as run_lock
import dino.training.run_state as run_state
from dino.atomic_files import atomic_write
from dino.config import Config
from dino.data.datasets import open_training_data
from dino.devices import resolve_device, resolve_precision
from dino.errors import DinoError
from dino.training.bad_files import BadFiles
from dino.training.batches import Batches, check_steps_per_epoch
from dino.training.distributed import Dist, setup_distributed
from dino.training.init_from import against_start, log_start
from dino.training.knn import check_knn_k, teacher_knn
from dino.training.learner import Learner, build_learner
from dino.training.memory import check_memory
from dino.training.metrics import MetricsFile
from dino.training.monitor import CollapseMonitor
from dino.training.schedules import (
    Schedules,
    shorten_warmups,
    stretch_to_min_steps,
    warn_if_too_short,
)
from dino.training.step import step_seed, train_step
from dino.training.stopping import Interrupted, StopSignals

log = logging.getLogger("dino")


class Trainer:
    """Owns one run: networks, optimizer, loss, schedules, data and the run folder."""

    def __init__(self, cfg: Config, resume: str | Path | None = None) -> None:
        self.d: Dist = setup_distributed(cfg.run.device)
        self.device = resolve_device(cfg.run.device, self.d.world, self.d.local_rank)
        self.precision = resolve_precision(cfg.run.precision, self.device)
        self.run_dir, resume_state = run_state.open_run_dir(cfg, resume, self.d.world, self.d.main)
        if self.d.world > 1:  # every process checked the folder before rank 0 writes to it
            dist.barrier()
        torch.manual_seed(cfg.run.seed + self.d.rank)
        # a folder's file list is cached beside it, or in the run folder (read-only parent)
        self.data = open_training_data(cfg.data.data, cfg.data.subset, self.run_dir)
        check_knn_k(cfg, self.data)  # k values larger than the k-NN bank
        self.steps_per_epoch = check_steps_per_epoch(len(self.data.train), cfg, self.d.world)
        # the run's config, final from here on: warm-ups longer than --epochs are shortened;
        # a small dataset's epochs are few steps, so the run grows to --min-steps (the config
        # written to the run folder says so), and a run still too short to learn is warned about
        self.cfg = cfg = stretch_to_min_steps(shorten_warmups(cfg), self.steps_per_epoch)[0]
        self.batches = Batches(cfg, self.data.train, self.d, self.device)
        global_batch = self.batches.sampler.global_batch
        warn_if_too_short(cfg, self.steps_per_epoch, len(self.data.train), global_batch)
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.sched = Schedules.build(cfg, self.steps_per_epoch, global_batch)
        check_memory(cfg, self.device, len(self.data.train))  # before allocating the networks
        self.learner: Learner = build_learner(
            cfg, self.d, self.device, self.precision, load_init=resume_state is None
        )
        self.monitor = CollapseMonitor(cfg.model.out_dim, self.batches.sampler.batch_size)
        self.iteration = 0
        self.bad_files = BadFiles(
            self.run_dir, cfg.data.data, len(self.data.train), cfg.data.max_bad_fraction, self.d
        )
        self.knn_history: list[dict[str, Any]] = []
        self.knn_start: dict[str, Any] | None = None  # k-NN of the --init weights
        self.last_saved: int | None = None
        source = Path(resume) if resume is not None else None
        source = source if source is None or source.is_dir() else source.parent
        self.resumed_in_place = source is not None and source.resolve() == self.run_dir.resolve()
        if resume_state is not None:
            run_state.load_state_dict(self, resume_state)
            self.last_saved = self.iteration
            self._check_work_left(resume)
        self.steps_run = self.good_steps = 0  # in this process's session
        self.stop = StopSignals(self.d, self.device)
        self._log_handler: logging.Handler | None = None

    def step(self, views: list[torch.Tensor]) -> dict[str, Any]:
        """The training step of the current iteration on ``views`` (the iteration does not
        advance). Drop path draws from torch's generator: seeding it from the iteration makes
        every step independent of what ran before it (resume, k-NN evaluation, DataLoader
        start-up)."""
        torch.manual_seed(step_seed(self.cfg.run.seed, self.d.rank, self.iteration))
        return train_step(self.learner, views, self.sched.at(self.iteration))

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

    def knn(self) -> dict[str, dict[str, float]] | None:
        """Weighted k-NN of the teacher backbone's fp32 features (bank: train, queries: held
        out), the numbers ``dino knn`` gives for the same weights."""
        return teacher_knn(self.learner.teacher.backbone, self.data, self.cfg, self.d, self.device)

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
        """The epoch loop; a stop signal saves and exits (:meth:`_exit_on_signal`)."""
        cfg = self.cfg
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
        t_start, cpu_start = time.time(), time.process_time()
        with self.stop:
            try:
                if cfg.model.init and self.iteration == 0 and self.knn_start is None:
                    self.knn_start = log_start(self.knn(), metrics)
                self._evaluate_missed_epoch_end(metrics)
                for epoch in range(self.iteration // self.steps_per_epoch, cfg.optim.epochs):
                    self._train_epoch(epoch, metrics)
                    self._end_epoch(epoch, metrics)
            except RuntimeError as exc:
                if not self.stop.stopped_workers(exc):
                    raise
                self._exit_on_signal(mid_step=True)
            except Interrupted:
                self._exit_on_signal(mid_step=False)
        results: dict[str, Any] = {
            "iterations": self.iteration,
            "train_seconds": time.time() - t_start,
            # this process's CPU time (all its threads): the cost on a machine shared with others
            "train_cpu_seconds": time.process_time() - cpu_start,
        }
        knn = self._eval_and_log(metrics, cfg.optim.epochs)
        if self.d.main:
            results["knn"] = knn
            results["knn_history"] = self.knn_history
            results["knn_start"] = self.knn_start  # of the --init weights (None without)
            results["bad_files"] = len(self.bad_files.paths)
            text = json.dumps(results, indent=2)
            atomic_write(self.run_dir / "results.json", lambda f: f.write(text.encode()))
            log.info("run folder: %s", self.run_dir)
        return results

    def _train_epoch(self, epoch: int, metrics: MetricsFile | None) -> None:
        """The steps of ``epoch`` from the current iteration on."""
        start = self.iteration - epoch * self.steps_per_epoch
        with tqdm(
            total=self.steps_per_epoch,
            initial=start,
            desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}",
            disable=not self.d.main,
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        ) as bar:
            t_last, n_last = time.time(), 0
            for views, bad in self._batches(epoch, start):
                self.bad_files.note(bad)
                it = self.iteration
                out = self.step(views)
                self.iteration += 1
                self.steps_run += 1
                self.good_steps += "skipped" not in out
                n_last += views[0].shape[0] * self.d.world
                self._after_step(it, out, metrics)
                now = time.time()
                if "loss" in out and now - t_last > 2.0:
                    bar.set_postfix(
                        loss=f"{out['loss']:.3f}", img_s=f"{n_last / (now - t_last):.0f}"
                    )
                    t_last, n_last = now, 0
                bar.update(1)
                self.stop.check()
                if self._checkpoint_due():
                    self.save()

    def _checkpoint_due(self) -> bool:
        """Whether a checkpoint is written after this step, within an epoch (``--save-every``;
        the epoch end saves in :meth:`_end_epoch`); never in a streak of skipped steps, which
        keeps the last good checkpoint."""
        every, it = self.cfg.run.save_every, self.iteration
        return (
            bool(every)
            and it % every == 0
            and bool(it % self.steps_per_epoch)
            and (not self.monitor.bad_streak)
        )

    def _end_epoch(self, epoch: int, metrics: MetricsFile | None) -> None:
        """After ``epoch``: refuse a run that trained nothing, evaluate when due (the last
        evaluation is the results'), save, and stop if asked."""
        last = epoch + 1 == self.cfg.optim.epochs
        if last and self.steps_run and not self.good_steps:
            raise DinoError(self._no_update_message())
        if self._eval_due(epoch + 1) and not last:
            self._eval_and_log(metrics, epoch + 1)
        if not self.monitor.bad_streak or last:
            self.save()
        self.stop.check()

    def _evaluate_missed_epoch_end(self, metrics: MetricsFile | None) -> None:
        """A resumed checkpoint written at an epoch end before its evaluation: evaluate now."""
        epoch = self.iteration // self.steps_per_epoch
        evaluated = {int(h["epoch"]) for h in self.knn_history}
        if (
            0 < epoch < self.cfg.optim.epochs
            and self.iteration == epoch * self.steps_per_epoch
            and self._eval_due(epoch)
            and epoch not in evaluated
        ):
            self._eval_and_log(metrics, epoch)
            self.save()

    def _exit_on_signal(self, mid_step: bool) -> None:
        """Save the current iteration and exit with 128 + the signal; ``mid_step``: the signal
        also reached a DataLoader worker that was starting, and torch reported it in the middle
        of a step, whose state is then not known to be whole: keep the last checkpoint."""
        signum = self.stop.signum or 0
        if mid_step:
            log.warning(
                "signal %d received while the data loader's workers stopped: keeping %s",
                signum,
                "no checkpoint (none was written yet)"
                if self.last_saved is None
                else f"the last checkpoint (iteration {self.last_saved})",
            )
        else:
            log.warning(
                "signal %d received: saving a checkpoint at iteration %d and exiting",
                signum,
                self.iteration,
            )
            if self.last_saved != self.iteration:
                self.save()
        log.warning("continue with `dino train --resume %s`", self.run_dir)
        raise SystemExit(128 + signum) from None

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
                if not self.stop.stopped_workers(exc):
                    raise
                raise Interrupted from None
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
            v = self.sched.at(it)
            metrics.write(
                {
                    "iteration": it,
                    "epoch": it / self.steps_per_epoch,
                    **out,
                    "lr": v.lr,
                    "wd": v.weight_decay,
                    "momentum": v.momentum,
                    "teacher_temp": v.teacher_temp,
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


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Run DINO pretraining as ``cfg`` says (continuing the run folder ``resume`` if given) and
    return the results (final weighted k-NN when the data has labels)."""
    with run_lock.run_session() as session:  # the run folder's lock, released at the end
        trainer = Trainer(cfg, resume)
        session.started()
        results = trainer.fit()
        trainer.d.close()
    return results
