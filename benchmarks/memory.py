"""Peak memory of one DINO training step by architecture x batch x precision x the memory flags
(``--checkpoint-activations``, ``--accumulate``): the table of docs/memory.md.

Each setting runs in a fresh process (``--probe``): it builds the run's networks, optimizer and
losses (:func:`dino.training.learner.build_learner`), makes a random batch of the recipe's views
(2 x 224 + 8 x 96 by default), allocates the optimizer's state, then measures one
:func:`~dino.training.step.train_step`:

* CPU: the process's resident memory. Linux's peak (``VmHWM``) is reset just before the step
  (``/proc/self/clear_refs``) and read after it; the step's peak is that minus the memory before
  it (``VmRSS``). glibc's allocator runs with a fixed ``MALLOC_MMAP_THRESHOLD_`` of 64 KiB, so
  every tensor of that size or more is its own mapping, returned to the system when freed:
  resident memory then follows the live tensors instead of the allocator's cache.
* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated memory before the step.

What the step adds on top of the networks and optimizer state: activations, gradients, the
teacher's outputs. The loss of every setting is recorded beside it, to show that the flags
change the memory and not the results (same batch, same weights, same drop-path draws)::

    python benchmarks/memory.py                       # ViT-S/16, batch 16/32, fp32 and bf16
    python benchmarks/memory.py --arch vit_pico --patch-size 4 --global-size 32 \\
        --local-size 16 --batches 8 --out-dim 256      # a quick trial
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS_DIR, current_rss_mb, machine_name, peak_rss_mb, stamp, table  # noqa: E402

from dino.config import load_config  # noqa: E402
from dino.devices import resolve_device  # noqa: E402
from dino.training.distributed import Dist  # noqa: E402
from dino.training.learner import build_learner  # noqa: E402
from dino.training.schedules import StepValues  # noqa: E402
from dino.training.step import train_step  # noqa: E402

#: The flag settings measured for each (images per optimizer step, precision), as
#: ``(accumulate, checkpointing)``: ``--batch-size`` is the images per step / accumulate.
FLAGS = ((1, False), (1, True), (2, False), (2, True))


def probe(s: dict[str, Any]) -> dict[str, Any]:
    """One setting's step, measured in this process (call it in a fresh one)."""
    device = resolve_device(s["device"])
    cfg = load_config("default", {
        "arch": s["arch"], "patch_size": s["patch_size"], "global_size": s["global_size"],
        "local_size": s["local_size"], "local_crops": s["local_crops"], "out_dim": s["out_dim"],
        "batch_size": s["batch"] // s["accumulate"], "accumulate": s["accumulate"],
        "checkpoint_activations": s["checkpoint"], "precision": s["precision"],
        "device": str(device), "koleo_weight": 0.0,
    })  # fmt: skip
    m = build_learner(cfg, Dist(), device, s["precision"])
    g = torch.Generator().manual_seed(0)
    d = cfg.data
    sizes = [d.global_size] * 2 + [d.local_size] * d.local_crops
    views = [torch.randn(s["batch"], 3, n, n, generator=g).to(device) for n in sizes]
    for p in m.params:  # the optimizer's state exists before the measured step, as in a run
        p.grad = torch.zeros_like(p)
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)
    values = StepValues(100, 1e-4, 0.04, 0.996, 0.04, freeze_last_layer=False)
    torch.manual_seed(0)  # the same drop-path draws in every setting
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        before = current_rss_mb()
    t0 = time.perf_counter()
    out = train_step(m, views, values)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_rss_mb()
    return {
        **s,
        "step_peak_mb": round(peak - before, 1),
        "before_step_mb": round(before, 1),
        "step_seconds": round(time.perf_counter() - t0, 2),
        "loss": out.get("loss"),
    }


def run_probe(s: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", json.dumps(s)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"probe {s} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def save(path: Path, rows: list[dict[str, Any]], device: torch.device) -> None:
    """Write the results so far, each row with ``vs_plain``: its peak over the peak of the same
    images per step and precision without the flags (when that one was measured)."""
    for r in rows:
        plain = [
            q["step_peak_mb"]
            for q in rows
            if (q["batch"], q["precision"], q["accumulate"], q["checkpoint"])
            == (r["batch"], r["precision"], 1, False)
        ]
        r["vs_plain"] = round(r["step_peak_mb"] / plain[0], 3) if plain else None
    result = {
        **stamp(device),
        "machine": machine_name(device),
        "note": "2-core AMD EPYC VM shared with other jobs: step_seconds were taken under heavy "
        "load and only say that checkpointing recomputes; memory does not depend on the load",
        "method": "fresh process per setting; CPU: VmHWM reset before the step minus VmRSS "
        "before it, glibc MALLOC_MMAP_THRESHOLD_=65536; CUDA: max_memory_allocated",
        "rows": rows,
    }
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--batches", default="16,32", help="images per optimizer step (comma list)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, help="default: benchmarks/results/memory-<machine>.json")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return
    base = {k: getattr(args, k) for k in ("arch", "patch_size", "global_size", "local_size")}
    base |= {"local_crops": args.local_crops, "out_dim": args.out_dim, "device": args.device}
    device = torch.device(args.device)
    out = args.output or RESULTS_DIR / f"memory-{'cpu' if device.type == 'cpu' else 'gpu'}.json"
    rows: list[dict[str, Any]] = []
    for precision, batch, (accumulate, checkpoint) in itertools.product(
        args.precisions.split(","), [int(b) for b in args.batches.split(",")], FLAGS
    ):
        s = {**base, "batch": batch, "accumulate": accumulate, "checkpoint": checkpoint}
        rows.append(run_probe({**s, "precision": precision}))
        print(json.dumps(rows[-1]), flush=True)
        save(out, rows, device)  # after each setting: a long run's partial table is kept
    cols = ["arch", "batch", "accumulate", "checkpoint", "precision", "step_peak_mb", "vs_plain"]
    print(table(rows, cols + ["step_seconds", "loss"], "peak memory of one training step"))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
