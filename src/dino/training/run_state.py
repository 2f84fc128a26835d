"""The state of a run in its folder: what a checkpoint holds, saving it, and resuming from it
(also with another number of processes).

A checkpoint holds everything the next step depends on: networks, optimizer, loss scaler, center,
iteration. The data order and the augmentations are pure functions of (seed, epoch, sample), and
torch's generator, which drop path draws from, is reseeded from (seed, rank, iteration) at every
step (:func:`dino.training.step.step_seed`), so a run resumed after a kill at any moment ends with
the weights of an uninterrupted run.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dino.atomic_files import save_torch
from dino.config import Config
from dino.errors import DinoError
from dino.training.checkpoint import (
    LATEST,
    has_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dino.training.distributed import replica_spread

if TYPE_CHECKING:
    from dino.training.trainer import Trainer

log = logging.getLogger("dino")


def default_run_dir() -> str:
    """The run folder of a run without ``--output-dir``: ``runs/<date>-<time>``. A multi-process
    launch chooses it once, so that every process agrees on it."""
    return f"runs/{datetime.now():%Y%m%d-%H%M%S}"


def open_run_dir(
    cfg: Config, resume: str | Path | None, main: bool
) -> tuple[Path, dict[str, Any] | None]:
    """The run folder and, when resuming, the checkpoint state to continue from.

    ``resume``: a run folder or one of its checkpoint files (None: a new run in
    ``cfg.run.output_dir``, which must not hold a run already). ``main``: whether this process
    may clean up what interrupted writes left in the folder.
    """
    if resume is None:
        run_dir = Path(cfg.run.output_dir or default_run_dir())
        if (run_dir / LATEST).exists():
            raise DinoError(
                f"{run_dir} already holds a run; continue it with "
                f"`dino train --resume {run_dir}` or choose another --output-dir"
            )
        return run_dir, None
    resume = Path(resume)
    run_dir = resume if resume.is_dir() else resume.parent
    state = None
    if resume.is_dir() and (resume / "config.yaml").exists() and not has_checkpoint(resume):
        log.warning(
            "%s holds no checkpoint yet (the run stopped before writing one): "
            "starting it from the beginning",
            resume,
        )
    else:
        state = load_checkpoint(resume)
    if main:
        for p in remove_stale_temporaries(run_dir):
            log.info("removed %s, left by a write that was interrupted", p)
    return run_dir, state


def state_dict(t: Trainer) -> dict[str, Any]:
    """The checkpoint of the trainer ``t`` at its current iteration."""
    t.loss_fn.apply_center_update()
    t.additions.apply_center_update()
    ibot = t.additions.ibot_loss
    return {
        "student": t.student.state_dict(),
        "teacher": t.teacher.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scaler": t.scaler.state_dict(),
        "dino_loss": t.loss_fn.state_dict(),
        **({"ibot_loss": ibot.state_dict()} if ibot is not None else {}),
        "iteration": t.iteration,
        "epoch": t.iteration // t.steps_per_epoch,
        "world_size": t.d.world,
        "config": t.cfg.to_dict(),
        "rng": rng_state(),
        "bad_files": t.bad_files.paths,
        "knn_history": t.knn_history,
        "monitor": t.monitor.state_dict(),
    }


def load_state_dict(t: Trainer, s: dict[str, Any]) -> None:
    """Put the checkpoint ``s`` into the trainer ``t``."""
    try:
        t.student.load_state_dict(s["student"])
        t.teacher.load_state_dict(s["teacher"])
        t.optimizer.load_state_dict(s["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise DinoError(
            f"the checkpoint does not match this config ({str(exc).splitlines()[0]}); resume "
            "with the config.yaml of its run folder"
        ) from None
    t.scaler.load_state_dict(s["scaler"])
    t.loss_fn.load_state_dict(s["dino_loss"])
    if t.additions.ibot_loss is not None and "ibot_loss" in s:
        t.additions.ibot_loss.load_state_dict(s["ibot_loss"])
    t.iteration = int(s["iteration"])
    t.bad_files.paths = list(s.get("bad_files", []))
    t.knn_history = list(s.get("knn_history", []))
    if "monitor" in s:
        t.monitor.load_state_dict(s["monitor"])
    if s.get("world_size", 1) != t.d.world:
        _adapt_to_world(t, s)
    elif "rng" in s:
        set_rng_state(s["rng"])
        if t.d.world > 1:
            torch.manual_seed(t.cfg.run.seed * 1000 + t.d.rank + t.iteration)


def _adapt_to_world(t: Trainer, s: dict[str, Any]) -> None:
    """Resume a checkpoint written by another number of processes.

    With the same global batch (per-process ``--batch-size`` x processes) nothing changes:
    global batch ``g`` holds the same samples and augmentations whatever the number of
    processes. With another global batch the position in the epoch is converted to the new
    number of steps per epoch (in samples seen), the learning rate follows the new global
    batch, and the data order differs from an uninterrupted run: both are warned about.
    """
    old_world = int(s.get("world_size", 1))
    old_batch = int(
        (s.get("config") or {}).get("optim", {}).get("batch_size", t.cfg.optim.batch_size)
    )
    old_global, new_global = old_world * old_batch, t.batches.sampler.global_batch
    if old_global == new_global:
        log.warning(
            "resuming a run written by %d process(es) with %d: the global batch (%d), the "
            "data order and the augmentations are unchanged; only drop-path randomness "
            "differs from an uninterrupted run",
            old_world,
            t.d.world,
            new_global,
        )
        return
    n = len(t.data.train)
    old_steps = max(1, n // old_global)
    epoch, step = divmod(t.iteration, old_steps)
    converted = epoch * t.steps_per_epoch + min(
        step * old_global // new_global, t.steps_per_epoch - 1
    )
    keep = old_global // t.d.world
    log.warning(
        "resuming a run written by %d process(es) of batch %d (global batch %d) with %d "
        "process(es) of batch %d (global batch %d): the data order from here on differs from "
        "an uninterrupted run, iteration %d becomes %d and the learning rate follows the new "
        "global batch%s",
        old_world,
        old_batch,
        old_global,
        t.d.world,
        t.cfg.optim.batch_size,
        new_global,
        t.iteration,
        converted,
        f"; pass --batch-size {keep} to keep the global batch"
        if keep * t.d.world == old_global
        else "",
    )
    t.iteration = converted


def save(t: Trainer) -> None:
    """Write the checkpoint of the current iteration (atomically), the teacher backbone
    (``teacher_backbone.pth``) and ``bad_files.txt``. Every process calls it."""
    if t.d.world > 1:
        t.bad_files.merge()
        spread = replica_spread(t.teacher)
        if spread > 0:
            log.warning(
                "the teacher weights differ between processes (parameter sums by up to "
                "%.3g): every process should hold the same weights; please report this",
                spread,
            )
    if t.d.main:
        save_checkpoint(state_dict(t), t.run_dir, t.cfg.run.keep)
        save_torch(t.teacher.backbone.state_dict(), t.run_dir / "teacher_backbone.pth")
        t.bad_files.write()
    t.last_saved = t.iteration
    if t.d.world > 1:
        dist.barrier()
    t.bad_files.check_fraction()
