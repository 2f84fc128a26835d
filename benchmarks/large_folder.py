"""A folder of 200 000 images: listing it, its memory, ``dino check-data``, and the first step.

Generates the folder once in /tmp (never in the repository): ``--files`` small JPEGs (64 x 48,
cut from scikit-image's photographs) in 100 class folders. Then, each in a fresh process:

* **scan**: listing the folder without the cache (:func:`dino.data.datasets.scan_folder`), its
  time and the resident memory the file list holds afterwards; the same for the listing as it
  was before the compact index (a sorted list of path strings and a list of labels), for
  comparison;
* **cached**: the same call once the index is cached beside the folder;
* **check-data**: ``dino check-data`` over the whole folder (every file decoded);
* **first batch**: from nothing loaded to the first augmented batch of ``dino train``'s own
  ``Batches`` (batched path, 2 workers), on this folder (without and with the cached index)
  and on a folder of 64 files, and the resident memory then;
* **first step**: ``dino train --data DIR`` with a tiny ViT, from the start of the process to
  its first logged step, with and without the cached index, and the training process's resident
  memory then; the same command on a folder of 64 files is the baseline (start-up, model, the
  step itself).

    python benchmarks/large_folder.py                # 200 000 files
    python benchmarks/large_folder.py --files 20000  # a quicker trial
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import machine_name, save_results, stamp, table

ROOT = Path(__file__).resolve().parent.parent


def make_folder(root: Path, n: int, classes: int = 100) -> None:
    """``n`` JPEGs of 64 x 48 in ``classes`` folders (256 distinct pictures, repeated)."""
    done = root / ".complete"
    if done.exists() and done.read_text() == str(n):
        return
    import skimage.data as sk
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = [getattr(sk, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
    blobs = []
    for i in range(256):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 96), rng.integers(0, p.shape[1] - 128)
        im = Image.fromarray(p[y : y + 96, x : x + 128]).resize((64, 48), Image.BICUBIC)
        path = root / "blob.jpg"
        root.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=85)
        blobs.append(path.read_bytes())
    (root / "blob.jpg").unlink()
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(exist_ok=True)
    for i in range(n):
        c = i % classes
        (root / f"class{c:03d}" / f"img{i:07d}.jpg").write_bytes(blobs[i % len(blobs)])
    done.write_text(str(n))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) / 1024
    return float("nan")


def part(name: str, data: str) -> dict:
    """One measurement, in this (fresh) process."""
    import gc

    from dino.data.datasets import IMAGE_EXTENSIONS, scan_folder
    from dino.data.file_index import cache_path

    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    if name.startswith("first-batch"):  # open the data as dino train does, one batch
        return first_batch(data, nocache=name.endswith("nocache"))
    if name == "scan-before":  # the listing before the compact index: Python strings
        root = Path(data)
        files = sorted(
            str(p)
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
        rel = [Path(f).relative_to(root).parts for f in files]
        classes = sorted({parts[0] for parts in rel})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[parts[0]] for parts in rel]
        del rel
        held = (files, labels)
    else:
        if name == "scan":
            cache = cache_path(data)
            if cache is not None:
                cache.unlink(missing_ok=True)
        held = scan_folder(data)
    seconds = time.perf_counter() - t0
    gc.collect()
    out = {"seconds": seconds, "files": len(held[0]), "held_mb": rss_mb() - before}
    if name != "scan-before":
        out["path_bytes_mb"] = held[0].nbytes() / 2**20
        out["label_bytes_mb"] = held[1].nbytes / 2**20
    return out


def first_batch(data: str, nocache: bool) -> dict:
    """Seconds from nothing loaded to the first augmented batch of ``dino train``'s own
    ``Batches`` (batched path, 2 workers), and the resident memory then."""
    import torch

    from dino.config_load import load_config
    from dino.data.datasets import open_training_data
    from dino.data.file_index import cache_path
    from dino.training.batches import Batches
    from dino.training.distributed import Dist

    if nocache and cache_path(data) is not None:
        cache_path(data).unlink(missing_ok=True)
    cfg = load_config(overrides={"data": data, "global_size": 64, "local_size": 32,
                                 "local_crops": 2, "batch_size": 16, "num_workers": 2,
                                 "device": "cpu"})  # fmt: skip
    before = rss_mb()
    t0 = time.perf_counter()
    train = open_training_data(data).train
    opened = time.perf_counter() - t0
    batches = Batches(cfg, train, Dist(), torch.device("cpu"))
    views, _bad = next(batches.epoch(0))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "open_seconds": opened, "files": len(train),
            "rss_mb": rss_mb(), "held_mb": rss_mb() - before}  # fmt: skip


def run_part(name: str, data: str) -> dict:
    cmd = [sys.executable, __file__, "--part", name, "--data", data]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_data(data: str, workers: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dino", "check-data", data, "--workers", str(workers)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - t0
    summary = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else proc.stderr[-300:]
    return {"seconds": seconds, "exit_code": proc.returncode, "summary": summary}


def process_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def first_step(data: str, workers: int, out: Path) -> dict:
    """Seconds from starting ``dino train`` to its first metrics line; then stop it."""
    args = [
        sys.executable, "-m", "dino", "train", "--data", data, "--output-dir", str(out),
        "--arch", "vit_tiny", "--patch-size", "16", "--global-size", "64", "--local-size", "32",
        "--local-crops", "2", "--out-dim", "1024", "--batch-size", "16", "--epochs", "1",
        "--warmup-epochs", "0",
        "--log-every", "1", "--num-workers", str(workers), "--device", "cpu",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "metrics.jsonl"
    seconds = rss = worker_rss = None
    while proc.poll() is None and time.perf_counter() - t0 < 1800:
        if metrics.exists() and metrics.read_text().strip():
            seconds = time.perf_counter() - t0
            rss = process_rss_mb(proc.pid)
            worker_rss = [process_rss_mb(c) for c in children(proc.pid)]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # saves a checkpoint and stops
    _, err = proc.communicate(timeout=600)
    if seconds is None:
        raise RuntimeError(f"no step was logged:\n{err[-2000:]}")
    return {"seconds": seconds, "rss_mb": rss, "worker_rss_mb": worker_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--folder", default="/tmp/dino-large-folder")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader and check-data workers")
    parser.add_argument(
        "--parts", default="scan,check,first-batch,first-step", help="what to measure"
    )
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(part(args.part, args.data)))
        return

    data = Path(args.folder) / f"images-{args.files}"
    t0 = time.perf_counter()
    make_folder(data, args.files)
    print(f"folder {data}: {args.files} files ({time.perf_counter() - t0:.0f} s to make)")
    parts = args.parts.split(",")
    rows = []
    if "scan" in parts:
        for name in ("scan-before", "scan", "cached"):
            r = run_part(name, str(data))
            rows.append({"measure": name, **r})
            print(rows[-1])
    if "check" in parts:
        rows.append({"measure": "check-data", **check_data(str(data), max(args.workers, 1))})
        print(rows[-1])
    if "first-batch" in parts:
        small = Path(args.folder) / "images-64"
        make_folder(small, 64, classes=4)
        for r in range(2):  # twice, alternating: the machine is shared
            for name, folder in (
                ("first-batch", small),
                ("first-batch-nocache", data),
                ("first-batch", data),
            ):
                r_part = run_part(name, str(folder))  # round 0 warms up: page cache, imports
                if r:
                    rows.append({"measure": f"{name}, {folder.name}", **r_part})
                    print(rows[-1])
    if "first-step" in parts:
        from dino.data.file_index import cache_path

        small = Path(args.folder) / "images-64"  # the same command on 64 files: the baseline
        make_folder(small, 64, classes=4)
        with tempfile.TemporaryDirectory() as tmp:
            cache = cache_path(data)
            if cache is not None:
                cache.unlink(missing_ok=True)
            for name, folder in (
                ("first step, 64 files", small),
                (f"first step, {args.files} files, no cached index", data),
                (f"first step, {args.files} files, cached index", data),
            ):
                out = Path(tmp) / name.replace(" ", "_").replace(",", "")
                rows.append({"measure": name, **first_step(str(folder), args.workers, out)})
                print(rows[-1])
    cols = ["measure", "seconds", "files", "held_mb", "path_bytes_mb", "rss_mb"]
    print(table(rows, cols, f"{args.files} files, {args.workers} worker(s)"))
    result = {**stamp(_cpu()), "files": args.files, "workers": args.workers, "rows": rows}
    result["load_average_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_save:
        key = f"files{args.files}-{args.parts.replace(',', '+')}"
        path = save_results(machine_name(_cpu()), "large_folder", key, result)
        print(f"written to {path}")


def _cpu():
    import torch

    return torch.device("cpu")


if __name__ == "__main__":
    main()
