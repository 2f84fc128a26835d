"""Video object segmentation by label propagation: the DAVIS-2017 semi-supervised protocol.

The first frame's object mask is given; every later frame's mask is predicted from frozen patch
features alone, as the paper does (after Jabri et al., 2020):

* each frame is resized so that its shorter side is ``size`` (480) px and its longer side in
  proportion, rounded down to a multiple of 64 as the reference does; its patch tokens (last
  block, after the final norm, [CLS] dropped) are L2-normalized;
* the context is the first frame (with its given mask, one-hot on the patch grid) and the last
  ``n_last_frames`` (7) frames (with their predicted soft masks);
* for each patch of the new frame, the ``topk`` (5) most similar context patches (cosine) within
  a square of ``size_mask_neighborhood`` (12) patches around its position, over all context
  frames together, vote for their labels with weights ``softmax(sim / 0.1)``;
* the soft mask is upsampled bilinearly by the patch size, each object's channel min-max
  normalized, the argmax taken and resized (nearest) to the frame's size.

Only the context is held in memory, never the whole video. The scores are those of the DAVIS
evaluation (:mod:`dino.eval.davis_scores`), over every annotated frame except the first (given)
and the last, as fractions in [0, 1].
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dino.errors import DinoError
from dino.eval.davis_io import (
    Video,
    check_output,
    check_video,
    davis_palette,
    find_videos,
    load_frame,
    read_mask,
    write_indexed_png,
)
from dino.eval.davis_scores import boundary_f, jaccard, summarize
from dino.eval.label_propagation import (
    FeatureFn,
    LabelPropagation,
    TrackSettings,
    labels_to_ids,
    mask_to_labels,
    working_size,
)
from dino.eval.outputs import Backbone, resolve_backbone, write_json
from dino.eval.patch_features import cls_and_patch_tokens, vit_patch_size
from dino.models.weights import input_stats

log = logging.getLogger("dino")


def track_video(
    video: Video,
    features: FeatureFn,
    output_dir: Path,
    patch: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    settings: TrackSettings | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Segment one video into ``output_dir/<frame stem>.png`` (indexed, DAVIS palette) and score
    the frames that have ground truth. Returns the video's entry of the results."""
    settings = settings or TrackSettings()
    palette = davis_palette()
    first_ids = read_mask(video.first_mask)
    size_hw = first_ids.shape
    n_objects = int(first_ids.max())
    work = working_size(size_hw[0], size_hw[1], settings.size, patch)
    grid = (work[0] // patch, work[1] // patch)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_indexed_png(output_dir / f"{video.frames[0].stem}.png", first_ids, palette)

    def feats_of(frame: Path) -> torch.Tensor:
        f = features(load_frame(frame, work, mean, std))
        if tuple(f.shape[:2]) != grid:
            raise DinoError(f"features of {frame} have the grid {tuple(f.shape[:2])}, not {grid}")
        return f.reshape(grid[0] * grid[1], -1)

    first = feats_of(video.frames[0])
    context = LabelPropagation(
        first, mask_to_labels(first_ids, n_objects, grid).to(first.device), grid, settings
    )
    per_frame: dict[int, tuple[list[float], list[float]]] = {
        o: ([], []) for o in range(1, n_objects + 1)
    }
    last = len(video.frames) - 1
    bar = tqdm(video.frames[1:], desc=video.name, unit="frame", leave=False, disable=not progress)
    for t, frame in enumerate(bar, start=1):
        labels = context(feats_of(frame))
        ids = labels_to_ids(labels, grid, patch, size_hw)
        write_indexed_png(output_dir / f"{frame.stem}.png", ids, palette)
        gt_path = video.annotations / f"{frame.stem}.png" if video.annotations else None
        if t < last and gt_path is not None and gt_path.is_file():
            gt = read_mask(gt_path)
            for o, (js, fs) in per_frame.items():
                g, p = gt == o, ids == o
                js.append(jaccard(g, p))
                fs.append(boundary_f(g, p))
    bar.close()
    entry: dict[str, Any] = {"frames": len(video.frames), "objects": n_objects}
    scored = len(next(iter(per_frame.values()))[0]) if per_frame else 0
    entry["scored_frames"] = scored
    if scored:
        objects = {
            str(o): {"J": float(np.mean(js)), "F": float(np.mean(fs))}
            for o, (js, fs) in per_frame.items()
        }
        jm = float(np.mean([v["J"] for v in objects.values()]))
        fm = float(np.mean([v["F"] for v in objects.values()]))
        entry.update({"J&F": (jm + fm) / 2, "J": jm, "F": fm, "per_object": objects})
        entry["_per_frame"] = per_frame
    return entry


def backbone_features(model: nn.Module, device: torch.device) -> FeatureFn:
    """The patch features of a ViT backbone as a :data:`FeatureFn` (on ``device``)."""

    def features(x: torch.Tensor) -> torch.Tensor:
        return cls_and_patch_tokens(model, x[None].to(device))[1][0].float()

    return features


def video_segmentation(
    backbone: Backbone,
    data: str | Path,
    output: str | Path,
    first_mask: str | Path | None = None,
    annotations: str | Path | None = None,
    settings: TrackSettings | None = None,
    json_out: str | Path | None = None,
    device: str = "auto",
    features: FeatureFn | None = None,
) -> dict[str, Any]:
    """Segment every video of ``data`` by label propagation and score it when there is ground
    truth (the DAVIS-2017 semi-supervised protocol; see the module docstring).

    Args:
        backbone: a ViT module, weights for :func:`dino.load_backbone`, or a function returning
            the module (called once the inputs are checked).
        data: a DAVIS root, or a folder of frames (then ``first_mask`` is required).
        output: masks go to ``output/<video>/<frame stem>.png``; existing masks are never
            overwritten (an error instead).
        first_mask: the first frame's mask, for a folder of frames.
        annotations: for a folder of frames, a folder of ground-truth masks named like the
            frames, to score against.
        settings: the propagation's parameters (default: the paper's).
        json_out: also write the results there (must not exist).
        device: ``auto``, ``cpu``, ``cuda``.
        features: a :data:`FeatureFn` to use instead of the backbone's patch tokens.

    Returns ``{"J&F", "J", "F", ... (fractions in [0, 1], None without ground truth),
    "videos": {name: {"J&F", "J", "F", "per_object", "frames", ...}}, "settings", ...}``.
    """
    from dino.devices import resolve_device

    settings = settings or TrackSettings()
    settings.check()
    videos = find_videos(data, first_mask, annotations)
    sizes = {v.name: check_video(v) for v in videos}
    out = Path(output)
    check_output(out, videos, json_out)
    dev = resolve_device(device)
    model = resolve_backbone(backbone, dev)
    patch = vit_patch_size(model, "video segmentation by label propagation")
    info = getattr(model, "weights_info", None)
    mean, std = input_stats(model)
    feats = features or backbone_features(model, dev)
    results: dict[str, dict[str, Any]] = {}
    progress = sys.stderr.isatty()
    for i, video in enumerate(videos, start=1):
        entry = track_video(video, feats, out / video.name, patch, mean, std, settings, progress)
        results[video.name] = entry
        h, w = sizes[video.name]
        score = (
            f"J&F {entry['J&F']:.3f} (J {entry['J']:.3f}, F {entry['F']:.3f})"
            if "J&F" in entry
            else "no ground truth"
        )
        log.info(
            "[%d/%d] %s: %d frames of %dx%d, %d objects, %s",
            i,
            len(videos),
            video.name,
            entry["frames"],
            w,
            h,
            entry["objects"],
            score,
        )
    summary = summarize(
        [scores for entry in results.values() for scores in entry.pop("_per_frame", {}).values()]
    )
    res: dict[str, Any] = {
        **summary,
        "scores": "fractions in [0, 1]",
        "videos": results,
        "settings": asdict(settings),
        "data": str(data),
        "output": str(out),
        "weights": info.source if info else None,
        "patch_size": patch,
    }
    if json_out is not None:
        write_json(json_out, res)
    return res
