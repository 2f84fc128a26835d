"""What the checkpoint checksum costs: save and load time of a ViT-S/16 training checkpoint
(student, teacher, AdamW state; 65536-dimensional heads) with and without it.

``python benchmarks/checkpoint_integrity.py [--rounds 3] [--dir DIR]``

* save: :func:`dino.atomic_files.atomic_write` of ``torch.save`` (the write without a checksum)
  against :func:`dino.atomic_files.save_torch` (the same write, hashed as it goes, plus the
  24-byte trailer); both fsync the file.
* load: ``torch.load`` against :func:`dino.atomic_files.load_torch` (verify, then load).
* the hash functions alone over the checkpoint's bytes (XXH3-128, the one used; SHA-256 and
  BLAKE2b for comparison), in GB/s.

Save and load are timed in interleaved rounds (``harness.interleave``); the overhead is the
median over rounds of (with - without) / without, in wall time and in this process's CPU time.
Results: ``results/checkpoint_integrity.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).parent))

from harness import RESULTS_DIR, interleave, stamp  # noqa: E402

from dino.atomic_files import atomic_write, load_torch, save_torch  # noqa: E402
from dino.config_load import load_config  # noqa: E402
from dino.training.networks import build_networks  # noqa: E402


def vit_small_checkpoint() -> dict:
    """A checkpoint as ``dino train`` writes it for ViT-S/16 (AdamW moments filled)."""
    cfg = load_config(None, {"arch": "vit_small", "patch_size": 16, "out_dim": 65536})
    torch.manual_seed(0)
    student, teacher = build_networks(cfg, load_init=False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": opt.state_dict(),
        "iteration": 1000,
        "config": cfg.to_dict(),
    }


def cpu_timed(fn: Callable[[], object], into: list[float]) -> Callable[[], None]:
    """``fn``, also recording the CPU seconds of this process it took (less sensitive than the
    wall time to other jobs on a shared machine)."""

    def timed() -> None:
        t0 = time.process_time()
        fn()
        into.append(time.process_time() - t0)

    return timed


def overhead(with_: list[float], without: list[float]) -> float:
    """Median over rounds of the relative extra time."""
    return statistics.median((a - b) / b for a, b in zip(with_, without, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="folder to write in (default: a temporary one)")
    args = ap.parse_args()
    state = vit_small_checkpoint()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        plain, summed = Path(tmp) / "plain.pth", Path(tmp) / "summed.pth"
        cpu: dict[str, list[float]] = {k: [] for k in ("save_plain", "save_checksum")}
        cpu |= {k: [] for k in ("load_plain", "load_checksum")}
        steps = {
            "save_plain": lambda: atomic_write(plain, lambda f: torch.save(state, f)),
            "save_checksum": lambda: save_torch(state, summed),
        }
        saves = interleave(
            {k: cpu_timed(fn, cpu[k]) for k, fn in steps.items()}, rounds=args.rounds
        )
        steps = {
            "load_plain": lambda: torch.load(plain, weights_only=False),
            "load_checksum": lambda: load_torch(summed, weights_only=False),
        }
        loads = interleave(
            {k: cpu_timed(fn, cpu[k]) for k, fn in steps.items()}, rounds=args.rounds
        )
        cpu = {k: v[-args.rounds :] for k, v in cpu.items()}  # the timed rounds
        data = summed.read_bytes()
    size_gb = len(data) / 1e9
    hashes = {}
    for name, fn in (
        ("xxh3_128", lambda: xxhash.xxh3_128(data).digest()),
        ("sha256", lambda: hashlib.sha256(data).digest()),
        ("blake2b", lambda: hashlib.blake2b(data).digest()),
    ):
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        hashes[name] = {"seconds": min(times), "gb_per_s": size_gb / min(times)}
    med = {k: statistics.median(v) for k, v in {**saves, **loads}.items() if ":" not in k}
    result = {
        **stamp(torch.device("cpu")),
        "note": "2-core AMD EPYC VM shared with other jobs: timings taken under load",
        "checkpoint": "ViT-S/16 student + teacher (65536-d heads) + AdamW state",
        "size_gb": size_gb,
        "rounds": args.rounds,
        "median_seconds": med,
        "save_overhead": overhead(saves["save_checksum"], saves["save_plain"]),
        "load_overhead": overhead(loads["load_checksum"], loads["load_plain"]),
        "median_cpu_seconds": {k: statistics.median(v) for k, v in cpu.items()},
        "save_cpu_overhead": overhead(cpu["save_checksum"], cpu["save_plain"]),
        "load_cpu_overhead": overhead(cpu["load_checksum"], cpu["load_plain"]),
        "rounds_seconds": {k: v for k, v in {**saves, **loads}.items() if ":" not in k},
        "hash_alone": hashes,
        "hash_share_of_save": hashes["xxh3_128"]["seconds"] / med["save_plain"],
        "other_cpu_share": statistics.median(
            saves["save_plain:other"] + saves["save_checksum:other"]
        ),
    }
    out = RESULTS_DIR / "checkpoint_integrity.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
