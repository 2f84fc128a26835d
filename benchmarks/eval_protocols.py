"""Speed and memory of the dense evaluations: ``dino track``, ``dino retrieval``.

* frames per second of label propagation on DAVIS-sized frames (854x480), end to end (decode,
  patch features, propagation, upsampling, PNG writing, scoring) and the propagation alone;
* images per second of the retrieval feature extraction (single and multi-scale);
* resident memory along a long video: it must stay flat, since only the context (the first and
  the last ``--n-last-frames`` frames) is kept.

The frames are made from scikit-image photos (a panning background and a moving object with
its exact mask); the networks are randomly initialized (the time does not depend on the
weights).

    python benchmarks/eval_protocols.py                       # vit_small/16, the paper's model
    python benchmarks/eval_protocols.py --arch vit_pico --frames 12 --memory-frames 40
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from harness import current_rss_mb, machine_name, save_results, stamp, table
from PIL import Image

from dino.eval.davis_io import Video, davis_palette, write_indexed_png
from dino.eval.global_features import SCALES, global_feature
from dino.eval.image_files import Thumbnail, image_batches
from dino.eval.label_propagation import TrackSettings, propagate, working_size
from dino.eval.patch_features import vit_patch_size
from dino.eval.video_segmentation import backbone_features, track_video
from dino.models.weights import load_backbone


def photo(name: str) -> np.ndarray:
    import skimage.data

    a = getattr(skimage.data, name)()
    return a if a.ndim == 3 else np.stack([a] * 3, -1)


def make_video(folder: Path, n: int, h: int = 480, w: int = 854) -> Video:
    """``n`` frames: a background photo panning left, a cat moving right (mask id 1)."""
    bg = np.asarray(Image.fromarray(photo("coffee")).resize((w + 4 * n, h)))
    cat = np.asarray(Image.fromarray(photo("chelsea")).resize((160, 110)))
    frames, gt = folder / "frames", folder / "gt"
    frames.mkdir(parents=True)
    gt.mkdir()
    pal = davis_palette()
    for t in range(n):
        img = bg[:, 2 * t : 2 * t + w].copy()
        ids = np.zeros((h, w), np.uint8)
        x0, y0 = 40 + 5 * t % (w - 200), 180
        img[y0 : y0 + 110, x0 : x0 + 160] = cat
        ids[y0 : y0 + 110, x0 : x0 + 160] = 1
        Image.fromarray(img).save(frames / f"{t:05d}.jpg", quality=90)
        write_indexed_png(gt / f"{t:05d}.png", ids, pal)
    return Video("bench", sorted(frames.iterdir()), gt / "00000.png", gt)


def time_tracking(model, video: Video, size: int, out: Path, rss: list[float] | None = None):
    """Seconds per frame (after the first) of the whole pipeline, and the video's scores."""
    patch = vit_patch_size(model)
    feats = backbone_features(model, torch.device("cpu"))
    stamps: list[float] = []

    def timed(x: torch.Tensor) -> torch.Tensor:
        stamps.append(time.perf_counter())
        if rss is not None:
            rss.append(current_rss_mb())
        return feats(x)

    info = model.weights_info
    entry = track_video(video, timed, out, patch, info.mean, info.std, TrackSettings(size=size))
    gaps = np.diff(stamps[1:])  # frame t's features to frame t+1's: one whole step
    return float(np.median(gaps)), entry


def time_propagation(model, size: int, rounds: int = 5) -> float:
    """Seconds of one propagation step alone (8 context frames, the paper's k and radius)."""
    patch = vit_patch_size(model)
    h, w = working_size(480, 854, size, patch)
    grid = (h // patch, w // patch)
    n, d = grid[0] * grid[1], int(model.embed_dim)
    g = torch.Generator().manual_seed(0)
    src = F.normalize(torch.randn(8, n, d, generator=g), dim=2)
    tgt = F.normalize(torch.randn(n, d, generator=g), dim=1)
    labels = torch.softmax(torch.randn(8, 3, n, generator=g), 1)
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        propagate(tgt, src, labels, grid, 5, 12)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def time_retrieval(model, paths: list[Path], imsize: int, multiscale: bool) -> float:
    """Images per second of the retrieval features (decode, thumbnail, network)."""
    info = model.weights_info
    scales = SCALES if multiscale else (1.0,)
    t0 = time.perf_counter()
    n = 0
    for x in image_batches(paths, Thumbnail(imsize, info.mean, info.std), 1, 0):
        global_feature(model, x, scales)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--sizes", default="480,240", help="comma list of --size values")
    parser.add_argument("--frames", type=int, default=10, help="frames of the speed video")
    parser.add_argument("--memory-frames", type=int, default=120, help="frames of the long video")
    parser.add_argument("--memory-size", type=int, default=240)
    parser.add_argument("--images", type=int, default=24, help="retrieval images")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_backbone("random", arch=args.arch, patch_size=args.patch_size)
    device = torch.device("cpu")
    name = f"{args.arch}/{args.patch_size}"
    results: dict = {"stamp": stamp(device), "model": name}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        video = make_video(root / "speed", args.frames)
        track_rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            sec, _ = time_tracking(model, video, size, root / f"out{size}")
            prop = time_propagation(model, size)
            h, w = working_size(480, 854, size, args.patch_size)
            track_rows.append(
                {
                    "model": name,
                    "size": f"{w}x{h}",
                    "frames_per_s": 1 / sec,
                    "s_per_frame": sec,
                    "propagation_s": prop,
                    "propagation_share": prop / sec,
                }
            )
        print(
            table(
                track_rows,
                [
                    "model",
                    "size",
                    "frames_per_s",
                    "s_per_frame",
                    "propagation_s",
                    "propagation_share",
                ],
                "dino track: one frame, end to end (decode, features, propagation, PNG, scores)",
            )
        )
        results["track"] = track_rows

        long = make_video(root / "long", args.memory_frames)
        rss: list[float] = []
        time_tracking(model, long, args.memory_size, root / "outlong", rss)
        marks = [m for m in (10, 30, 60, 120, 240) if m < len(rss)] + [len(rss) - 1]
        mem_rows = [{"frame": m, "rss_mib": round(rss[m])} for m in marks]
        growth = (rss[-1] - rss[10]) / max(1, len(rss) - 11) * 100
        print(
            table(
                mem_rows,
                ["frame", "rss_mib"],
                f"resident memory along a {len(rss)}-frame video (--size {args.memory_size}): "
                f"{growth:+.2f} MiB per 100 frames after frame 10",
            )
        )
        results["memory"] = {
            "size": args.memory_size,
            "frames": len(rss),
            "rss_mib": mem_rows,
            "growth_mib_per_100_frames": growth,
        }

        photos = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina"]
        paths = []
        for i in range(args.images):
            p = root / f"img{i}.jpg"
            a = photo(photos[i % len(photos)])
            Image.fromarray(a[..., :3]).resize((1024, 768)).save(p, quality=90)
            paths.append(p)
        ret_rows = []
        for imsize, multiscale in ((224, False), (224, True), (512, False), (512, True)):
            ips = time_retrieval(model, paths, imsize, multiscale)
            ret_rows.append(
                {"model": name, "imsize": imsize, "multiscale": multiscale, "images_per_s": ips}
            )
        print(
            table(
                ret_rows,
                ["model", "imsize", "multiscale", "images_per_s"],
                "dino retrieval: features of 1024x768 JPEGs (decode, thumbnail, network)",
            )
        )
        results["retrieval"] = ret_rows
    if not args.no_save:
        path = save_results(machine_name(device), "eval_protocols", name, results)
        print(f"\nresults -> {path}")


if __name__ == "__main__":
    main()
