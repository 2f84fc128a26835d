"""``python tests/helpers/train_with_faults.py DINO_ARGS...``: run the ``dino`` command with
the faults that the ``FAULTS`` environment variable names installed (test-only; the product
never reads it). Faults, separated by commas:

* ``kill-before-step:N``: SIGKILL when the step of iteration N is about to run;
* ``kill-while-saving:N``: SIGKILL in the middle of writing the checkpoint of iteration N;
* ``rank-fails:R:N:kill`` / ``rank-fails:R:N:raise``: process R of a ``--nproc`` run dies or
  raises at iteration N.

With ``--nproc``, the processes torchrun starts run this script too (instead of ``python -m
dino``), so that the faults reach them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import faults  # noqa: E402


def install(spec: str, mp: pytest.MonkeyPatch) -> None:
    for fault in filter(None, spec.split(",")):
        kind, *args = fault.split(":")
        if kind == "kill-before-step":
            faults.install_kill_before_step(mp, int(args[0]))
        elif kind == "kill-while-saving":
            faults.install_kill_while_saving(mp, int(args[0]))
        elif kind == "rank-fails":
            faults.install_rank_failure(mp, int(args[0]), int(args[1]), args[2])
        else:
            raise SystemExit(f"train_with_faults: unknown fault {fault!r}")


def run_workers_through_this_script(mp: pytest.MonkeyPatch) -> None:
    """``dino train --nproc N`` starts torchrun on ``python -m dino``: make it start this
    script instead, with the same arguments."""
    import torch.distributed.run as torchrun

    real_run = torchrun.run

    def run(args: object) -> None:
        args.module = False
        args.training_script = str(Path(__file__).resolve())
        real_run(args)

    mp.setattr(torchrun, "run", run)


def main() -> int:
    mp = pytest.MonkeyPatch()
    install(os.environ.get("FAULTS", ""), mp)
    run_workers_through_this_script(mp)
    from dino.cli import main as dino_main

    return dino_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
