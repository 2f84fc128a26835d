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
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dino.atomic_files import save_torch
from dino.config import Config
from dino.config_checks import resume_changes
from dino.config_load import load_config
from dino.data.datasets import TrainingData
from dino.errors import DinoError
from dino.training import run_lock
from dino.training.bad_files import BadFiles
from dino.training.batches import Batches
from dino.training.checkpoint import (
    LATEST,
    NUMBERED,
    has_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dino.training.distributed import Dist, replica_spread
from dino.training.learner import Learner
from dino.training.monitor import CollapseMonitor

log = logging.getLogger("dino")


class Run(Protocol):
    """What a checkpoint holds of a run, and where it goes (the trainer's attributes)."""

    cfg: Config
    d: Dist
    learner: Learner
    data: TrainingData
    batches: Batches
    bad_files: BadFiles
    monitor: CollapseMonitor
    run_dir: Path
    iteration: int
    steps_per_epoch: int
    knn_history: list[dict[str, Any]]
    last_saved: int | None
    resumed_in_place: bool


def process_batch(optim: dict[str, Any]) -> int:
    """Images per process and optimizer step of a saved config's ``optim`` section (0:
    unknown)."""
    return int(optim.get("batch_size", 0)) * int(optim.get("accumulate", 1))


def default_run_dir() -> str:
    """The run folder of a run without ``--output-dir``: ``runs/<date>-<time>``. A multi-process
    launch chooses it once, so that every process agrees on it."""
    return f"runs/{datetime.now():%Y%m%d-%H%M%S}"


#: What a run writes into its folder; a new run refuses a folder that holds any of them.
RUN_FILES = (
    "checkpoint.pth",
    "checkpoint-*.pth",
    "teacher_backbone.pth",
    "results.json",
    "config.yaml",
    "metrics.jsonl",
    "train.log",
    "bad_files.txt",
    "events.out.tfevents.*",
)


def run_files(folder: str | Path) -> list[str]:
    """The names of the run files (:data:`RUN_FILES`) in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted({p.name for pattern in RUN_FILES for p in folder.glob(pattern)})


def check_new_run_dir(run_dir: str | Path) -> None:
    """Refuse a folder for a new run if it is a file or holds an earlier run's files (never
    overwrite a run)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DinoError(f"--output-dir {run_dir} is an existing file, not a folder")
    found = run_files(run_dir)
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise DinoError(
            f"{run_dir} already holds a run ({shown}); continue it with "
            f"`dino train --resume {run_dir}` or choose another --output-dir"
        )


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def resume_target(cfg: Config, saved: Config, source: Path) -> Path:
    """The folder a resumed run writes to: ``source`` itself, or the new folder that
    ``--output-dir`` names (then ``source`` stays as it is)."""
    out = cfg.run.output_dir
    if not out or out == saved.run.output_dir or Path(out).resolve() == source.resolve():
        return source
    return Path(out)


def check_resume(
    cfg: Config, source: Path, target: Path, world: int, state: dict[str, Any] | None
) -> None:
    """Refuse a resume that would not continue the run in ``source`` exactly.

    ``cfg`` is the run's config.yaml with the flags given now, ``state`` the checkpoint
    (None: the run wrote none yet), ``world`` the number of processes now. Settings marked
    ``on_resume="fixed"`` never change; ``"change"`` ones only into a new folder ``target``
    (``source`` is then left as it is); ``"free"`` ones anywhere. The batch size counts as
    changed only when the global batch (per-process batch x processes) changes.
    """
    saved = load_config(str(source / "config.yaml"))
    in_place = target == source
    changes = resume_changes(saved, cfg)
    changes.pop("output_dir", None)
    if in_place and state is not None and "images" in state:
        changes.pop("data", None)  # the same images moved elsewhere: the Trainer counts them
    if state is not None:
        old_batch = process_batch((state.get("config") or {}).get("optim", {}))
        old_world = int(state.get("world_size", 1))
        old_global = old_world * (old_batch or saved.optim.batch_size * saved.optim.accumulate)
        new_batch = cfg.optim.batch_size * cfg.optim.accumulate
        if old_global == world * new_batch:  # exact: the same global batch
            changes.pop("batch_size", None)
            changes.pop("accumulate", None)
        elif in_place and not {"batch_size", "accumulate"} & set(changes):  # processes only
            same = (
                f"pass --batch-size {old_global // world} to resume it exactly"
                if old_global % world == 0
                else f"resume it on {old_world} process(es)"
            )
            raise DinoError(
                f"{source} was made with a global batch of {old_global} ({old_world} "
                f"process(es) x {old_batch}); on {world} process(es) {same}, or add --output-dir "
                f"NEW to continue it with global batch {world * new_batch} in a new "
                f"run folder ({source} stays as it is)"
            )

    def said(items: dict[str, tuple[str, Any, Any]]) -> str:
        return ", ".join(
            f"{_flag(n)} {new} ({old} in the run)" for n, (_k, old, new) in items.items()
        )

    fixed = {n: v for n, v in changes.items() if v[0] == "fixed"}
    if fixed:
        raise DinoError(
            f"{said(fixed)} cannot be used to resume {source}: its checkpoint fits only the "
            f"run's own settings; drop {' '.join(_flag(n) for n in fixed)}"
        )
    changed = {n: v for n, v in changes.items() if v[0] == "change"}
    if changed and in_place:
        raise DinoError(
            f"{said(changed)} would change the run {source}, which resumes exactly as it was "
            f"made: drop {' '.join(_flag(n) for n in changed)}, or add --output-dir NEW to "
            f"continue it with the change in a new run folder ({source} stays as it is)"
        )
    if changed:
        log.warning(
            "continuing %s in %s with changed settings (%s): %s is left as it is",
            source,
            target,
            "; ".join(f"{n} {old} -> {new}" for n, (_k, old, new) in changed.items()),
            source,
        )


def open_run_dir(
    cfg: Config, resume: str | Path | None, world: int = 1, main: bool = True
) -> tuple[Path, dict[str, Any] | None]:
    """The run folder and, when resuming, the checkpoint state to continue from.

    ``resume``: a run folder or one of its checkpoint files (None: a new run in
    ``cfg.run.output_dir``, which must not hold a run already). A resumed run continues in its
    own folder exactly as it was, or, when ``cfg.run.output_dir`` names another folder, in that
    new folder with the changed settings (:func:`check_resume`). ``main``: whether this process
    may clean up what interrupted writes left in the folder.
    """
    if resume is None:
        run_dir = Path(cfg.run.output_dir or default_run_dir())
        check_new_run_dir(run_dir)
        if main:  # one writer per run folder; checked again once it is ours
            run_lock.acquire(run_dir)
            check_new_run_dir(run_dir)
        return run_dir, None
    resume = Path(resume)
    source = resume if resume.is_dir() else resume.parent
    if not (source / "config.yaml").exists():
        raise DinoError(
            f"{resume} is not a run folder (no config.yaml); pass the folder that `dino train` "
            "wrote"
        )
    target = resume_target(cfg, load_config(str(source / "config.yaml")), source)
    if target != source:
        check_new_run_dir(target)
    if main:
        run_lock.acquire(target)
    if resume.is_file() and target == source:
        newer = [
            p.name
            for p in source.glob("checkpoint-*.pth")
            if NUMBERED.match(p.name) and p.name > resume.name
        ]
        if resume.name != LATEST and newer:
            raise DinoError(
                f"{resume} is not the latest checkpoint of its run ({', '.join(sorted(newer))} "
                "came later): continuing from it in place would overwrite them; continue from it "
                "in a new run folder with --output-dir NEW"
            )
    state = None
    if resume.is_dir() and not has_checkpoint(resume):
        log.warning(
            "%s holds no checkpoint yet (the run stopped before writing one): "
            "starting it from the beginning",
            resume,
        )
    else:
        state = load_checkpoint(resume)
    check_resume(cfg, source, target, world, state)
    if main and target == source:
        for p in remove_stale_temporaries(source):
            log.info("removed %s, left by a write that was interrupted", p)
    return target, state


def state_dict(t: Run) -> dict[str, Any]:
    """The checkpoint of the run ``t`` at its current iteration."""
    return {
        **t.learner.state_dict(),
        "iteration": t.iteration,
        "epoch": t.iteration // t.steps_per_epoch,
        "world_size": t.d.world,
        "config": t.cfg.to_dict(),
        "rng": rng_state(),
        "bad_files": t.bad_files.paths,
        "knn_history": t.knn_history,
        "knn_start": t.knn_start,
        "monitor": t.monitor.state_dict(),
        "images": len(t.data.train),
    }


def load_state_dict(t: Run, s: dict[str, Any]) -> None:
    """Put the checkpoint ``s`` into the run ``t``."""
    trained_on = s.get("images")
    if t.resumed_in_place and trained_on is not None and trained_on != len(t.data.train):
        raise DinoError(
            f"{t.cfg.data.data} holds {len(t.data.train)} training images, the run in "
            f"{t.run_dir} trained on {trained_on}: resuming it there would change it; pass its "
            "own data with --data, or add --output-dir NEW to continue it on these images in a "
            "new run folder"
        )
    t.learner.load_state_dict(s)
    t.iteration = int(s["iteration"])
    t.bad_files.paths = list(s.get("bad_files", []))
    t.knn_history = list(s.get("knn_history", []))
    t.knn_start = s.get("knn_start")
    if "monitor" in s:
        t.monitor.load_state_dict(s["monitor"])
    old_world = int(s.get("world_size", 1))
    old_batch = process_batch((s.get("config") or {}).get("optim", {}))
    if old_batch and old_world * old_batch != t.batches.sampler.global_batch:
        _reposition(t, old_world, old_batch)  # into a new folder only (check_resume)
    elif old_world != t.d.world:
        differs = (
            "drop-path randomness and KoLeo (computed per process batch) differ"
            if t.cfg.loss.koleo_weight
            else "drop-path randomness differs"
        )
        log.warning(
            "resuming a run written by %d process(es) with %d: the global batch (%d), the "
            "data order and the augmentations are unchanged; only %s from an uninterrupted run",
            old_world,
            t.d.world,
            t.batches.sampler.global_batch,
            differs,
        )
    elif "rng" in s:
        set_rng_state(s["rng"])
        if t.d.world > 1:
            torch.manual_seed(t.cfg.run.seed * 1000 + t.d.rank + t.iteration)


def _reposition(t: Run, old_world: int, old_batch: int) -> None:
    """Continue a checkpoint written with another global batch (``old_world`` processes of
    ``old_batch``) in a new run folder: the position in the epoch is converted to the new
    number of steps per epoch (in samples seen); the learning rate follows the new global
    batch, and the data order differs from both runs."""
    old_global, new_global = old_world * old_batch, t.batches.sampler.global_batch
    n = len(t.data.train)
    old_steps = max(1, n // old_global)
    epoch, step = divmod(t.iteration, old_steps)
    converted = epoch * t.steps_per_epoch + min(
        step * old_global // new_global, t.steps_per_epoch - 1
    )
    log.warning(
        "continuing a checkpoint of global batch %d with global batch %d (%d process(es) of "
        "%d): iteration %d becomes %d, the learning rate follows the new global batch",
        old_global,
        new_global,
        t.d.world,
        t.batches.sampler.batch_size,
        t.iteration,
        converted,
    )
    t.iteration = converted


def save(t: Run) -> None:
    """Write the checkpoint of the current iteration (atomically), the teacher backbone
    (``teacher_backbone.pth``) and ``bad_files.txt``. Every process calls it."""
    if t.d.world > 1:
        t.bad_files.merge()
        spread = replica_spread(t.learner.teacher)
        if spread > 0:
            log.warning(
                "the teacher weights differ between processes (parameter sums by up to "
                "%.3g): every process should hold the same weights; please report this",
                spread,
            )
    if t.d.main:
        save_checkpoint(state_dict(t), t.run_dir, t.cfg.run.keep)
        save_torch(t.learner.teacher.backbone.state_dict(), t.run_dir / "teacher_backbone.pth")
        t.bad_files.write()
    t.last_saved = t.iteration
    if t.d.world > 1:
        dist.barrier()
    t.bad_files.check_fraction()
