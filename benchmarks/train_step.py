"""Images per second, peak memory and FLOP/s of one full DINO training step, ours vs a plain one.

One step: an augmented batch already in memory -> teacher forward (global views), student
forward and backward (all views), loss, per-parameter clipping, AdamW, teacher EMA, center.
"ours" is ``dino.training.step.train_step`` itself; "baseline" is the paper-faithful plain
step of ``benchmarks/baseline.py`` (fp32, and the same under autocast). All of them are built in
one process from the same weights and timed interleaved on the same batch (see ``harness.py``).

    # the recipe's ViT-S/16, 2x224 + 8x96 views, K = 65536 (the stable entry point)
    python benchmarks/train_step.py --arch vit_small --patch-size 16 --batch-size 16 \\
        --global-size 224 --local-size 96 --local-crops 8 --out-dim 65536 --steps 5 --json OUT.json
    # the built-in Fashion-MNIST preset (read at run time), fp32 and bf16, with torch.compile
    python benchmarks/train_step.py --preset fashion-mnist --precision fp32,bf16 --compile

Peak memory (``peak_mem_mb``) is what a step adds on top of the networks: activations,
gradients and optimizer state, i.e. the peak during two steps minus the memory before them
(CPU: resident memory of a fresh process per implementation; GPU: allocated memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from baseline import PlainStep
from harness import (
    current_rss_mb,
    gpu_bf16_peak,
    interleave,
    machine_name,
    paired_speedup,
    peak_rss_mb,
    save_results,
    stamp,
    synchronize,
    table,
)
from torch.utils.flop_counter import FlopCounterMode

from dino.config import Config
from dino.config_load import load_config
from dino.data.datasets import open_training_data
from dino.devices import AUTOCAST_DTYPES, resolve_device, resolve_precision
from dino.training.batches import Batches
from dino.training.distributed import Dist
from dino.training.networks import build_networks
from dino.training.schedules import Schedules
from dino.training.step import step_seed
from dino.training.trainer import Trainer

#: The iteration the timed steps start at: inside the learning-rate warm-up, lr > 0.
START_ITERATION = 1


@dataclass(frozen=True)
class Impl:
    """One timed implementation: ``ours`` or ``baseline``, a precision, compiled or not."""

    kind: str
    precision: str
    compiled: bool = False

    @property
    def name(self) -> str:
        return f"{self.kind}{'+compile' if self.compiled else ''}@{self.precision}"

    @classmethod
    def parse(cls, name: str) -> Impl:
        kind, precision = name.split("@")
        return cls(kind.removesuffix("+compile"), precision, kind.endswith("+compile"))


def build_config(args: argparse.Namespace, precision: str = "auto") -> Config:
    """The measured configuration: the preset as it is now, or the recipe with the flags."""
    overrides: dict[str, Any] = {
        "device": args.device,
        "precision": precision,
        "freeze_last_layer": 0,  # every step updates every parameter, in both implementations
        "output_dir": "/nonexistent/benchmark",  # never written: only train_step runs
    }
    flags = ("arch", "patch_size", "depth", "batch_size", "global_size", "local_size")
    flags += ("local_crops", "out_dim", "drop_path_rate")
    for name in flags:
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return load_config(args.preset or "default", overrides)


def config_label(cfg: Config) -> str:
    m, d = cfg.model, cfg.data
    return (
        f"{m.arch}-p{m.patch_size}-d{m.depth}-b{cfg.optim.batch_size}-{d.global_size}x2"
        f"+{d.local_size}x{d.local_crops}-K{m.out_dim}"
    )


def make_views(cfg: Config, device: torch.device) -> list[torch.Tensor]:
    """One augmented batch of the built-in data at the config's crop sizes (tensor path)."""
    train = open_training_data("fashion-mnist", subset=cfg.optim.batch_size).train
    batches = Batches(cfg, train, Dist(), device)
    views, _bad = next(iter(batches.epoch(0)))
    return [v.contiguous() for v in views]


class OursStep:
    """``train_step`` of a trainer built from the config (its data is never read)."""

    def __init__(self, cfg: Config, views: list[torch.Tensor]) -> None:
        self.trainer = Trainer(cfg)
        self.trainer.iteration = START_ITERATION
        self.views = views
        self.last_loss = float("nan")

    def __call__(self) -> None:
        out = self.trainer.step(self.views)
        self.last_loss = out.get("loss", float("nan"))
        self.trainer.iteration += 1


class BaselineStep:
    """:class:`baseline.PlainStep` on the same weights, schedules and drop-path seeds."""

    def __init__(self, cfg: Config, views: list[torch.Tensor], device: torch.device) -> None:
        torch.manual_seed(cfg.run.seed)  # the weights Trainer starts from
        student, teacher = build_networks(cfg)
        self.plain = PlainStep(
            student.to(device),
            teacher.to(device),
            cfg.model.out_dim,
            len(views),
            cfg.model.drop_path_rate,
            cfg.optim.clip_grad,
            cfg.loss.student_temp,
            cfg.loss.center_momentum,
            AUTOCAST_DTYPES[resolve_precision(cfg.run.precision, device)],
        )
        del student, teacher
        b = cfg.optim.batch_size
        self.sched = Schedules.build(cfg, max(1, 60000 // b), b)
        self.cfg, self.views = cfg, views
        self.iteration = START_ITERATION
        self.last_loss = float("nan")

    def __call__(self) -> None:
        it, s = self.iteration, self.sched
        torch.manual_seed(step_seed(self.cfg.run.seed, 0, it))  # drop path as ours draws it
        self.last_loss = self.plain.step(
            self.views, float(s.lr[it]), float(s.wd[it]), float(s.momentum[it]),
            float(s.teacher_temp[it]),
        )  # fmt: skip
        self.iteration += 1


def build_impl(impl: Impl, args: argparse.Namespace, views: list[torch.Tensor], device):
    cfg = build_config(args, impl.precision)
    if impl.kind == "ours":
        cfg.run.compile = impl.compiled
        return OursStep(cfg, views)
    return BaselineStep(cfg, views, device)


def count_flops(args: argparse.Namespace, views: list[torch.Tensor], device) -> float:
    """Matmul/convolution FLOPs of one step of the whole batch (forward and backward; the
    plain step at batch 1, times the batch: every such FLOP is proportional to the batch)."""
    cfg = build_config(args, "fp32")
    step = BaselineStep(cfg, [v[:1] for v in views], device)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops()) * views[0].shape[0]


def memory_probe(impl: Impl, args: argparse.Namespace) -> dict[str, float]:
    """Peak memory of two steps of ``impl`` (run in this process; call it in a fresh one)."""
    device = resolve_device(args.device)
    views = make_views(build_config(args), device)
    step = build_impl(impl, args, views, device)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = current_rss_mb()
    for _ in range(2):
        step()
    synchronize(device)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    )
    return {"peak_mem_mb": peak - before, "peak_total_mb": peak, "before_steps_mb": before}


def probe_in_subprocess(impl: Impl, argv: list[str]) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-probe", impl.name]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"memory probe of {impl.name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(lines[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", help="measure a preset as it is now (e.g. fashion-mnist)")
    p.add_argument("--arch", help="default: the preset's, else vit_small")
    p.add_argument("--patch-size", type=int)
    p.add_argument("--depth", type=int, help="blocks of our ViTs (12); fewer for quick trials")
    p.add_argument("--batch-size", type=int, help="default: 16 on CPUs, 64 on GPUs (recipe)")
    p.add_argument("--global-size", type=int)
    p.add_argument("--local-size", type=int)
    p.add_argument("--local-crops", type=int)
    p.add_argument("--out-dim", type=int)
    p.add_argument("--drop-path-rate", type=float)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--precision",
        default="auto",
        help="comma list of fp32, bf16, fp16, auto (auto: bf16 where supported); the fp32 "
        "baseline is always measured",
    )
    p.add_argument("--impl", choices=["both", "ours", "baseline"], default="both")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each first")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--machine", help="name of the results file (default: from the hardware)")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size is None and not args.preset:
        args.batch_size = 64 if resolve_device(args.device).type == "cuda" else 16
    return args


def summarize(
    times: list[float], other: list[float], batch: int, flops: float | None, device
) -> dict:
    median = statistics.median(times)
    row: dict[str, Any] = {
        "img_per_s": batch / median,
        "img_per_s_best": batch / min(times),
        "step_s": median,
        "step_s_all": [round(t, 4) for t in times],
        "other_cpu": statistics.median(other) if other else None,
    }
    if flops:
        row["tflop_per_s"] = flops / median / 1e12
        peak = gpu_bf16_peak(device)
        if peak:
            row["mfu"] = flops / median / peak
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(Impl.parse(args.memory_probe), args)))
        return {}
    device = resolve_device(args.device)
    base_cfg = build_config(args)
    precisions = [resolve_precision(p, device) for p in args.precision.split(",")]
    precisions = list(dict.fromkeys(precisions))
    impls: list[Impl] = []
    if args.impl in ("both", "ours"):
        impls += [Impl("ours", p) for p in precisions]
        if args.compile:
            impls += [Impl("ours", p, compiled=True) for p in precisions]
    if args.impl in ("both", "baseline"):
        impls += [Impl("baseline", p) for p in dict.fromkeys(["fp32", *precisions])]
    batch = base_cfg.optim.batch_size
    label = config_label(base_cfg)
    print(f"{label} on {device}: {', '.join(i.name for i in impls)}", flush=True)

    views = make_views(base_cfg, device)
    steps = {impl.name: build_impl(impl, args, views, device) for impl in impls}
    first_loss: dict[str, float] = {}

    def log_step(name: str, r: int, dt: float) -> None:
        first_loss.setdefault(name, steps[name].last_loss)
        print(f"  {name:24s} {'warm-up' if r < 0 else f'step {r}':8s} {dt:8.3f} s", flush=True)

    times = interleave(
        {n: s for n, s in steps.items()}, args.steps, args.warmup, device, on_step=log_step
    )
    steps.clear()  # free the networks before counting FLOPs
    flops = None if args.no_flops else count_flops(args, views, device)
    rows: dict[str, dict[str, Any]] = {}
    for impl in impls:
        row = summarize(times[impl.name], times[f"{impl.name}:other"], batch, flops, device)
        row["first_step_loss"] = first_loss.get(impl.name)
        row["first_step_s"] = times[f"{impl.name}:warmup"][0] if args.warmup else None
        if impl.compiled and args.warmup:
            row["compile_s"] = row["first_step_s"] - row["step_s"]
        if not args.no_memory and not impl.compiled:
            row.update(probe_in_subprocess(impl, argv))
        rows[impl.name] = row
    results = report(rows, impls, times, precisions, flops, label, device)
    path = None
    for p, result in results.items():
        if not args.no_save:
            key = f"{args.preset or 'flags'}:{label}:{p}:{args.impl}{':compile' * args.compile}"
            path = save_results(machine_name(device) if not args.machine else args.machine,
                                "train_step", key, result)  # fmt: skip
    if path:
        print(f"written to {path}")
    if args.json:
        out = next(iter(results.values())) if len(results) == 1 else results
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return results


def report(
    rows: dict[str, dict[str, Any]],
    impls: list[Impl],
    times: dict[str, list[float]],
    precisions: list[str],
    flops: float | None,
    label: str,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Print the table; return one result per precision in the stable JSON layout."""
    base_fp32 = "baseline@fp32"
    table_rows = []
    for impl in impls:
        row = dict(rows[impl.name], impl=impl.name)
        if base_fp32 in times and impl.name != base_fp32:
            row["x_vs_fp32_baseline"] = paired_speedup(times[impl.name], times[base_fp32])
        same = f"baseline@{impl.precision}"
        if impl.kind == "ours" and same in times:
            row["x_vs_same_prec_baseline"] = paired_speedup(times[impl.name], times[same])
        eager = f"ours@{impl.precision}"
        if impl.compiled and eager in times:
            row["x_vs_eager"] = paired_speedup(times[impl.name], times[eager])
        rows[impl.name] = {k: v for k, v in row.items() if k != "impl"}
        table_rows.append(row)
    cols = ["impl", "img_per_s", "img_per_s_best", "step_s", "other_cpu", "peak_mem_mb"]
    cols += ["tflop_per_s", "mfu"]
    cols += ["x_vs_fp32_baseline", "x_vs_same_prec_baseline", "x_vs_eager", "first_step_loss"]
    cols += ["compile_s"]
    cols = [c for c in cols if any(c in r for r in table_rows)]
    gflop = f", {flops / 1e9:.0f} GFLOP per step" if flops else ""
    print(table(table_rows, cols, f"train step {label} on {device}{gflop} (median of steps)"))
    results = {}
    for p in precisions:
        result: dict[str, Any] = {**stamp(device), "precision": p, "config": label}
        result["gflop_per_step"] = flops / 1e9 if flops else None
        for impl in impls:
            if impl.precision == p and impl.kind == "ours":
                result["ours_compiled" if impl.compiled else "ours"] = rows[impl.name]
        if base_fp32 in rows:
            result["baseline"] = rows[base_fp32]
        if p != "fp32" and f"baseline@{p}" in rows:
            result[f"baseline_{p}"] = rows[f"baseline@{p}"]
        results[p] = result
    return results


if __name__ == "__main__":
    main()
