"""The input pipeline of a folder of photos: images per second and per core, ours vs the reference.

Three pipelines read the same JPEG files through DataLoaders with ``--workers`` workers, in one
process, taking turns (rounds alternate their order):

* ``folder``: what ``dino train --data DIR`` runs (its own ``Batches``, default ``--augment``):
  workers decode each image and cut its 2 x 224 + 8 x 96 crops (``uint8``), the training process
  runs the photometric half batched on the training device (here the CPU, one thread);
* ``pil``: ``dino train --augment pil``: every view made per image with PIL / torchvision in the
  workers;
* ``reference``: the reference code's ``DataAugmentationDINO`` (rebuilt in
  ``benchmarks/reference_aug.py``) and its image loader;
* ``memory`` (``--paths ...,memory``): the same images decoded once and held in memory, as
  the built-in datasets are (the batched path without workers).

For each: wall-clock images per second, and CPU time per image, split into the workers' share
and the training process's (for ``folder``: its batched photometric half; for the others:
collecting the batch). ``img_per_cpu_s`` (images per CPU-second, i.e. per core) is what the
pipelines are compared on: the machine is shared, and CPU time is less sensitive to other jobs
than wall time. Also the cores per GPU each pipeline would need at a stated step rate (the
workers' CPU time only: on a GPU the photometric half runs on the GPU).

``--step`` adds the share of a ViT-S/16 bf16 training step on this CPU spent waiting for data
with the folder pipeline (``Trainer`` and ``train_step`` themselves).

    python benchmarks/input_pipeline.py --data DIR --workers 1 --json OUT   # stable entry point
    python benchmarks/input_pipeline.py --images 64 --step                   # photos made in /tmp

Without ``--data``, ``--images`` JPEGs of about 500 x 375 are cut from scikit-image's photographs
into a temporary folder in /tmp (with ``--preset fashion-mnist``: Fashion-MNIST PNGs). ``OUT``
gets ``{"folder": {"img_per_s": N, ...}, "pil": ..., "reference": ..., "ratios": ...,
"gpu": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import machine_name, save_results, stamp, table
from PIL import Image
from reference_aug import ReferenceFolder, ReferenceMultiCrop

from dino.config import Config
from dino.config_load import load_config
from dino.data.datasets import open_training_data
from dino.training.batches import Batches
from dino.training.distributed import Dist

#: Size of the photos made from scikit-image's pictures: a typical ImageNet photograph.
PHOTO_SIZE = (500, 375)
#: Step rates (images per second per GPU) at which the cores per GPU are stated.
GPU_RATES = (500, 1000, 2000)


def make_photos(root: Path, n: int, size: tuple[int, int] = PHOTO_SIZE) -> list[Path]:
    """``n`` JPEGs (quality 90): random crops (3/4 of each side, random flips) of scikit-image's
    photographs, resized to ``size``."""
    import skimage.data as sk

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina"]
    pics = [getattr(sk, name)() for name in names]
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = pics[i % len(pics)]
        h, w = p.shape[0] * 3 // 4, p.shape[1] * 3 // 4
        y, x = rng.integers(0, p.shape[0] - h), rng.integers(0, p.shape[1] - w)
        crop = p[y : y + h, x : x + w][:, :: rng.choice([-1, 1])]
        paths.append(root / f"photo{i:05d}.jpg")
        Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.BICUBIC).save(
            paths[-1], quality=90
        )
    return paths


def make_fashion_pngs(root: Path, n: int) -> None:
    """The first ``n`` Fashion-MNIST training images as 28 x 28 grayscale PNGs."""
    from dino.data.datasets import fashion_mnist

    root.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(fashion_mnist("train").images[:n]):
        Image.fromarray(x[0].numpy(), "L").save(root / f"fm{i:05d}.png")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker_pids(loader: torch.utils.data.DataLoader | None) -> list[int]:
    it = getattr(loader, "_iterator", None)
    return [w.pid for w in getattr(it, "_workers", [])]


class Pipeline:
    """One pipeline: ``run()`` goes through the folder once and returns its timings."""

    def __init__(self, name: str, loader: torch.utils.data.DataLoader | None, epoch_fn) -> None:
        self.name, self.loader, self.epoch_fn = name, loader, epoch_fn
        self.epoch = 0

    def run(self) -> dict[str, float]:
        pids = _worker_pids(self.loader)
        workers0 = sum(_cpu_seconds(p) for p in pids)
        main0, t0 = time.process_time(), time.perf_counter()
        images, waited = 0, 0.0
        it = iter(self.epoch_fn(self.epoch))
        while True:
            w0 = time.perf_counter()
            try:
                n, device_side = next(it)
            except StopIteration:
                break
            waited += time.perf_counter() - w0 - device_side
            images += n
        wall = time.perf_counter() - t0
        main = time.process_time() - main0
        pids = pids or _worker_pids(self.loader)
        workers = sum(_cpu_seconds(p) for p in pids) - workers0
        self.epoch += 1
        return {"images": images, "wall": wall, "main_cpu": main, "worker_cpu": workers,
                "waited": waited}  # fmt: skip


def timed_photometric(batches: Batches) -> list[float]:
    """Seconds of each call of the batched photometric half of ``batches`` (appended)."""
    seconds: list[float] = []
    aug = getattr(batches, "aug", None)
    if aug is not None:
        inner = aug.from_crops

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            seconds.append(time.perf_counter() - t0)
            return out

        aug.from_crops = timed
    return seconds


def folder_pipeline(cfg: Config, name: str) -> Pipeline:
    """``dino train``'s own batches (``Batches``) for ``cfg``, on the CPU."""
    data = open_training_data(cfg.data.data)
    batches = Batches(cfg, data.train, Dist(), torch.device("cpu"))
    photometric = timed_photometric(batches)

    def epoch(e: int):
        for views, _bad in batches.epoch(e):
            yield views[0].shape[0], photometric[-1] if photometric else 0.0

    return Pipeline(name, batches.loader, epoch)


def memory_pipeline(cfg: Config, files: list[str]) -> Pipeline:
    """The same images decoded once and held in memory (``TensorImages``): the batched path
    without DataLoader workers, as the built-in datasets run."""
    from dino.data.datasets import TensorImages, load_image

    images = torch.stack(
        [torch.from_numpy(np.array(load_image(f))).permute(2, 0, 1) for f in files]
    )
    batches = Batches(cfg, TensorImages(images, None, [], "memory"), Dist(), torch.device("cpu"))

    def epoch(e: int):  # all of it is the training process's own work: no waiting
        gen = batches.epoch(e)
        while True:
            t0 = time.perf_counter()
            views = next(gen, None)
            if views is None:
                return
            yield views[0][0].shape[0], time.perf_counter() - t0

    return Pipeline("memory", None, epoch)


def reference_pipeline(cfg: Config, files: list[str]) -> Pipeline:
    d = cfg.data
    transform = ReferenceMultiCrop(
        tuple(d.global_scale), tuple(d.local_scale), d.local_crops, d.global_size, d.local_size
    )
    workers = d.num_workers
    loader = torch.utils.data.DataLoader(
        ReferenceFolder(files, transform),
        batch_size=cfg.optim.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )

    def epoch(_e: int):
        for views, _labels in loader:
            yield views[0].shape[0], 0.0

    return Pipeline("reference", loader, epoch)


def summarize(name: str, runs: list[dict[str, float]]) -> dict[str, Any]:
    """Medians over rounds of the per-image costs."""

    def med(f) -> float:
        return statistics.median(f(r) for r in runs)

    per_img_cpu = med(lambda r: (r["main_cpu"] + r["worker_cpu"]) / r["images"])
    return {
        "path": name,
        "img_per_s": med(lambda r: r["images"] / r["wall"]),
        "img_per_cpu_s": 1.0 / per_img_cpu,
        "cpu_ms_per_img": 1000 * per_img_cpu,
        "worker_ms_per_img": 1000 * med(lambda r: r["worker_cpu"] / r["images"]),
        "main_ms_per_img": 1000 * med(lambda r: r["main_cpu"] / r["images"]),
        "wait_ms_per_img": 1000 * med(lambda r: r["waited"] / r["images"]),
        "rounds": len(runs),
        "images_per_round": runs[0]["images"],
    }


def paired(slow: list[dict[str, float]], fast: list[dict[str, float]], what: str) -> float:
    """Median over rounds of slow / fast time per image (CPU time, or wall time), the two
    timed in the same round."""

    def per_image(r: dict[str, float]) -> float:
        t = r["main_cpu"] + r["worker_cpu"] if what == "cpu" else r["wall"]
        return t / r["images"]

    return statistics.median(per_image(a) / per_image(b) for a, b in zip(slow, fast, strict=True))


def step_wait(cfg: Config, steps: int) -> dict[str, Any]:
    """A ViT-S/16 bf16 training step on this CPU fed by the folder pipeline: seconds per step,
    seconds blocked waiting for the DataLoader and seconds of the batched photometric half,
    per step (medians over ``steps`` steps after one warm-up step)."""
    from dino.training.trainer import Trainer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as out:
        overrides = {**cfg.to_dict(), "output_dir": out, "precision": "bf16", "arch": "vit_small",
                     "patch_size": 16, "out_dim": 65536, "epochs": 100}  # fmt: skip
        t = Trainer(load_config(overrides=overrides))
        photometric = timed_photometric(t.batches)
        gen = t.batches.epoch(0)
        rows = []
        for s in range(steps + 1):
            t0 = time.perf_counter()
            views, _bad = next(gen)
            t1 = time.perf_counter()
            t.step(views)
            t.iteration += 1
            t2 = time.perf_counter()
            if s:
                data = t1 - t0
                rows.append({"step": t2 - t1, "data": data, "photometric": photometric[-1]})
        gen.close()
    step = statistics.median(r["step"] for r in rows)
    data = statistics.median(r["data"] for r in rows)
    phot = statistics.median(r["photometric"] for r in rows)
    wait = max(0.0, data - phot)
    return {
        "batch_size": cfg.optim.batch_size,
        "workers": cfg.data.num_workers,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "step_s": step,
        "data_s": data,
        "photometric_s": phot,
        "wait_s": wait,
        "wait_share": wait / (step + data),
        "photometric_share": phot / (step + data),
        "per_step": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder of images (default: photos made in /tmp)")
    parser.add_argument("--images", type=int, default=64, help="photos to make without --data")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the folder")
    parser.add_argument("--paths", default="folder,pil,reference", help="also: memory")
    parser.add_argument("--preset", default="default", help="views of this preset")
    parser.add_argument("--step", action="store_true", help="also the ViT-S/16 step's wait")
    parser.add_argument("--step-steps", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core for the training process's share

    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="dino-photos-", dir="/tmp")
        data = str(Path(tmp.name) / "photos")
        if args.preset.startswith("fashion-mnist"):
            make_fashion_pngs(Path(data), args.images)
        else:
            make_photos(Path(data), args.images)
    base = load_config(args.preset)
    overrides = {"data": data, "batch_size": args.batch_size, "num_workers": args.workers,
                 "device": "cpu"}  # fmt: skip
    files = list(open_training_data(data).train.files)
    pipelines: dict[str, Pipeline] = {}
    names = args.paths.split(",")
    for name in names:
        if name == "reference":
            cfg = load_config(args.preset, overrides)
            pipelines[name] = reference_pipeline(cfg, files)
        elif name == "memory":
            pipelines[name] = memory_pipeline(load_config(args.preset, overrides), files)
        else:
            augment = "auto" if name == "folder" else name
            cfg = load_config(args.preset, {**overrides, "augment": augment})
            pipelines[name] = folder_pipeline(cfg, name)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds + 1):  # round 0 starts the workers and warms up
        for name in names if r % 2 == 0 else names[::-1]:
            result = pipelines[name].run()
            if r:
                runs[name].append(result)
    rows = [summarize(n, runs[n]) for n in names]
    result: dict[str, Any] = {**stamp(torch.device("cpu")), "data": data, "files": len(files),
                              "workers": args.workers, "batch_size": args.batch_size,
                              "preset": args.preset}  # fmt: skip
    d = base.data
    result["views"] = f"2x{d.global_size} + {d.local_crops}x{d.local_size}"
    for row in rows:
        result[row["path"]] = row
    by = {row["path"]: row for row in rows}
    if "folder" in by and "reference" in by:
        result["ratios"] = {  # medians over rounds of the ratio within each round
            "folder_vs_reference_per_core": paired(runs["reference"], runs["folder"], "cpu"),
            "folder_vs_reference_wall": paired(runs["reference"], runs["folder"], "wall"),
        }
        if "pil" in by:
            result["ratios"]["folder_vs_pil_per_core"] = paired(runs["pil"], runs["folder"], "cpu")
            result["ratios"]["pil_vs_reference_per_core"] = paired(
                runs["reference"], runs["pil"], "cpu"
            )
        result["gpu"] = {
            "note": "cores per GPU = step rate x worker CPU seconds per image (the photometric "
            "half runs on the GPU); measured per-core rates of this CPU",
            "rates": {
                str(rate): {
                    name: rate * by[name]["worker_ms_per_img"] / 1000
                    for name in by
                    if name != "memory"  # no workers: decoding happened before
                }
                for rate in GPU_RATES
            },
        }
    cols = ["path", "img_per_s", "img_per_cpu_s", "cpu_ms_per_img", "worker_ms_per_img",
            "main_ms_per_img", "wait_ms_per_img"]  # fmt: skip
    title = (
        f"{len(files)} files, views {result['views']}, {args.workers} worker(s), batch "
        f"{args.batch_size}, median of {args.rounds} rounds"
    )
    print(table(rows, cols, title))
    if "ratios" in result:
        print(json.dumps(result["ratios"], indent=1))
        print(json.dumps(result["gpu"]["rates"], indent=1))
    if args.step:
        for p in pipelines.values():  # stop their workers: the step gets the cores
            p.loader = None
        pipelines.clear()
        cfg = load_config(args.preset, {**overrides, "augment": "auto"})
        result["step"] = step_wait(cfg, args.step_steps)
        s = result["step"]
        print(
            f"ViT-S/16 bf16 step, batch {s['batch_size']}, {s['workers']} worker(s): "
            f"step {s['step_s']:.2f} s, blocked on data {s['wait_s']:.3f} s "
            f"({100 * s['wait_share']:.2f} %), photometric half {s['photometric_s']:.3f} s "
            f"({100 * s['photometric_share']:.2f} %)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_save:
        key = f"{args.preset}-workers{args.workers}"
        path = save_results(machine_name(torch.device("cpu")), "input_pipeline_folder", key, result)
        print(f"written to {path}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
