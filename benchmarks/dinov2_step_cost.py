"""Cost of a training step with each of DINOv2's additions, relative to the preset's step.

Every option is a :class:`~dino.training.trainer.Trainer` of the same preset (built-in
Fashion-MNIST by default) with one flag changed; all of them run ``train_step`` on the same
augmented batch, timed interleaved (``harness.interleave``: one step of each in turn, the order
reversed every round), so that the machine's load falls on all alike. The ratio of an option is
the median over rounds of (its step time / the preset's step time in the same round): the number
to multiply iterations by to compare runs at equal compute.

    python benchmarks/dinov2_step_cost.py --rounds 20
    python benchmarks/dinov2_step_cost.py --preset fashion-mnist-long --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from harness import interleave, machine_name, paired_speedup, save_results, stamp, table

from dino.config_load import load_config
from dino.training.trainer import Trainer

#: The options measured, as config overrides of the preset.
OPTIONS: dict[str, dict[str, object]] = {
    "preset": {},
    "koleo 0.1": {"koleo_weight": 0.1},
    "sinkhorn": {"centering": "sinkhorn"},
    "registers 4": {"registers": 4},
    "ibot 1.0": {"ibot_weight": 1.0},
    "ibot 1.0 separate head": {"ibot_weight": 1.0, "ibot_separate_head": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="fashion-mnist")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iteration", type=int, default=200, help="the schedules' iteration")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results")
    args = ap.parse_args()

    trainers: dict[str, Trainer] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in OPTIONS.items():
            run = Path(tmp) / name.replace(" ", "-")
            cfg = load_config(args.preset, {**overrides, "output_dir": str(run)})
            cfg.run.tensorboard = False
            t = Trainer(cfg)
            t.iteration = args.iteration
            trainers[name] = t
        first = next(iter(trainers.values()))
        views, _bad = next(first.batches.epoch(0))
        steps = {name: (lambda t=t: t.step(views)) for name, t in trainers.items()}
        times = interleave(steps, args.rounds, args.warmup, first.device)
    base = times["preset"]
    rows = []
    for name in OPTIONS:
        rows.append(
            {
                "option": name,
                "median step s": statistics.median(times[name]),
                "ratio to preset": paired_speedup(base, times[name]),
                "others' CPU share": statistics.median(times[f"{name}:other"]),
            }
        )
    print(
        table(
            rows,
            ["option", "median step s", "ratio to preset", "others' CPU share"],
            f"{args.preset}: step time of each addition, {args.rounds} interleaved rounds",
        )
    )
    if not args.no_save:
        device = first.device
        result = {
            **stamp(device),
            "rounds": args.rounds,
            "batch_size": first.cfg.optim.batch_size,
            "rows": rows,
        }
        path = save_results(machine_name(device), "dinov2_step_cost", args.preset, result)
        print(f"results -> {path}")


if __name__ == "__main__":
    main()
