"""``dino segment`` and ``dino attention-video``: what a ViT's attention and patch features
separate, pictured, scored against true masks, and filmed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dino.atomic_files import write_json
from dino.cli.flags import (
    add_norm_flags,
    add_threshold_flag,
    add_weights_flags,
    check_output,
    load_weights,
    output_names,
)
from dino.data.datasets import SCENE_DATASETS
from dino.errors import DinoError

SCENES = " or ".join(f"'{name}'" for name in SCENE_DATASETS)


def register(sub: Any) -> None:
    s = sub.add_parser(
        "segment",
        help="attention masks and PCA of patch features; Jaccard against true masks",
        description="For each image: the last block's [CLS] attention of every head, its masks "
        "keeping --threshold (60%) of each head's attention mass, and the first three principal "
        "components of the patch features as RGB with the foreground found by thresholding the "
        "first one. Pictures go to --output, one folder per image. With --score, the Jaccard "
        "index of those masks against true ones (the test scenes of "
        f"{SCENES}, or --data FOLDER with --masks MASK_FOLDER), next to a centre-disc prior "
        "of the true mask's area. See docs/segmentation.md.",
    )
    s.add_argument("images", nargs="*", help="image files or folders to draw (any format)")
    add_weights_flags(s)
    s.add_argument(
        "--data",
        default=None,
        help=f"{SCENES} (their 10000 test scenes, with masks) or a folder of images",
    )
    s.add_argument(
        "--masks",
        metavar="MASK_FOLDER",
        default=None,
        help="with --data FOLDER: the true masks, one image file per image with the same "
        "relative path and name (PNG; every non-zero pixel is foreground), of the image's size",
    )
    s.add_argument(
        "--score", action="store_true", help="compute the Jaccard scores (needs true masks)"
    )
    s.add_argument("--json", metavar="OUT", default=None, help="write the scores to this file")
    s.add_argument(
        "--output",
        default="segment",
        metavar="DIR",
        help="pictures are written here, one subfolder per image (default: segment)",
    )
    s.add_argument(
        "--pictures",
        type=int,
        default=None,
        metavar="N",
        help="draw the first N images of --data (default: 8, or 0 with --score); every "
        "positional image is drawn",
    )
    s.add_argument(
        "--subset",
        type=int,
        default=0,
        metavar="N",
        help=f"score only the first N test scenes of {SCENES} (default 0: all)",
    )
    s.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="PX",
        help="resize the shorter side of images (and masks) to this first (default: the "
        "scenes' 64 px; for other images the run's crop size when it trained under 224 px, "
        "else 480)",
    )
    add_threshold_flag(s)
    s.add_argument(
        "--batch-size", type=int, default=256, help="scenes per forward pass (default 256)"
    )
    add_norm_flags(s)
    s.set_defaults(run=segment)

    v = sub.add_parser(
        "attention-video",
        help="a video of a ViT's attention on every frame of a video",
        description="Read every frame of a video file (anything FFmpeg decodes) or of a folder "
        "of frames (sorted by name), and write a video of the frame, the mean of the heads' "
        "last-block [CLS] attention and each head's attention, side by side. Needs imageio and "
        "PyAV (pip install 'dino[video]').",
    )
    v.add_argument("source", help="a video file or a folder of frames")
    add_weights_flags(v)
    v.add_argument(
        "--output",
        dest="video",
        default=None,
        metavar="FILE",
        help="the video to write, .mp4 (H.264) or .gif (default: SOURCE's name with "
        "-attention.mp4, in the current folder); an existing file is replaced only once the "
        "new one is complete",
    )
    v.add_argument(
        "--fps",
        type=float,
        default=None,
        help="frames per second of the output (default: the video's, or 10 for a folder)",
    )
    v.add_argument(
        "--size",
        type=int,
        default=None,
        metavar="PX",
        help="resize each frame's shorter side to this (default: the run's crop size when it "
        "trained under 224 px, else 480); larger shows finer maps at a quadratic cost",
    )
    add_norm_flags(v)
    v.set_defaults(run=attention_video)


def _check(args: argparse.Namespace) -> None:
    if args.pictures is not None and args.pictures < 0:
        raise DinoError(f"--pictures must be 0 or more, got {args.pictures}")
    if args.score and not args.data:
        raise DinoError(
            f"--score needs --data: {SCENES}, or a folder of images with --masks MASK_FOLDER"
        )
    if args.masks and (not args.data or args.data in SCENE_DATASETS):
        raise DinoError("--masks goes with --data FOLDER (the images the masks belong to)")
    if args.score and args.data not in SCENE_DATASETS and not args.masks:
        raise DinoError(f"--score on {args.data} needs its true masks: pass --masks MASK_FOLDER")
    if args.json and not args.score:
        raise DinoError("--json writes the scores: add --score")
    if args.json:
        check_output(args.json, "--json", "file")
    if not args.images and not args.data:
        raise DinoError(f"nothing to segment: pass images, or --data {SCENES} or a folder")


def _print_scores(res: dict[str, Any], what: str) -> None:
    j = res["jaccard"]
    print(f"Jaccard index (%) of {res['images']} {what}")
    print(f"  attention, best head (head {res['best_head']}) {j['attention_best_head']:8.2f}")
    print(f"  attention, mean of heads        {j['attention_mean']:8.2f}")
    print(f"  PCA foreground                  {j['pca']:8.2f}")
    print(f"  centre prior of the same area   {j['centre_prior']:8.2f}")


def segment(args: argparse.Namespace) -> int:
    from dino.data.datasets import image_paths
    from dino.devices import resolve_device
    from dino.eval.api import run_config_of
    from dino.eval.attention import attention_patch_size
    from dino.eval.views import resolve_view
    from dino.viz.attention import default_image_size

    _check(args)
    backbone = load_weights(args)
    attention_patch_size(backbone)  # a convnet stops here, before any work
    device = resolve_device(args.device)
    run_config = run_config_of(backbone)
    if args.data in SCENE_DATASETS:
        view = resolve_view(args.data, run_config, None, None, args.mean, args.std)
        mean, std = list(view.mean), list(view.std)
    else:
        from dino.models.weights import input_stats

        run_mean, run_std = input_stats(backbone)
        mean, std = list(args.mean or run_mean), list(args.std or run_std)
    size = args.image_size
    if size is None and args.data not in SCENE_DATASETS:
        size = default_image_size(run_config) or None
    n_pictures = args.pictures if args.pictures is not None else (0 if args.score else 8)
    files = image_paths(args.images) if args.images else []  # a missing one stops here
    out = Path(args.output)
    draw = _Drawer(backbone, out, mean, std, device, args.threshold)

    result = None
    if args.data in SCENE_DATASETS:
        result = _scenes(args, draw, size, n_pictures)
    elif args.data:
        result = _folder(args, draw, size, n_pictures)
    if result is not None:
        result.update(
            threshold=args.threshold, weights=backbone.weights_info.source, data=args.data
        )
        _print_scores(
            result, "test scenes" if args.data in SCENE_DATASETS else f"images of {args.data}"
        )
        if args.json:
            write_json(args.json, result)
            print(f"scores -> {args.json}")
    for f, name in zip(files, output_names(files), strict=True):
        draw.file(f, size, name)
    if draw.count:
        print(f"pictures of {draw.count} images -> {out}")
    return 0


class _Drawer:
    """Writes the pictures of one image after another into ``out`` (one subfolder each)."""

    def __init__(
        self,
        backbone: Any,
        out: Path,
        mean: list[float],
        std: list[float],
        device: Any,
        mass: float,
    ) -> None:
        self.backbone, self.out, self.mean, self.std = backbone, out, mean, std
        self.device, self.mass, self.count = device, mass, 0

    def pixels(self, pix: Any, name: str, truth: Any = None) -> None:
        """An ``uint8 [3, H, W]`` image (H, W multiples of the patch size)."""
        from PIL import Image

        from dino.eval.segmentation import normalize, segment
        from dino.viz.segmentation import save_segmentation

        x = normalize(pix[None], self.mean, self.std).to(self.device)
        seg = segment(self.backbone, x, self.mass)
        picture = Image.fromarray(pix.permute(1, 2, 0).numpy())
        save_segmentation(picture, seg, 0, self.out / name, truth)
        self.count += 1

    def file(self, path: Path, size: int | None, name: str) -> None:
        import numpy as np
        import torch

        from dino.data.datasets import BadImage, load_image
        from dino.eval.attention import attention_patch_size
        from dino.viz.drawing import prepare_image

        try:
            img = load_image(path)
        except BadImage as exc:
            raise DinoError(f"cannot read the image {exc}; pass a readable image file") from None
        _x, picture = prepare_image(
            img, attention_patch_size(self.backbone), size, self.mean, self.std
        )
        self.pixels(torch.from_numpy(np.array(picture)).permute(2, 0, 1), name)


def _scenes(
    args: argparse.Namespace, draw: _Drawer, size: int | None, n_pictures: int
) -> dict[str, Any] | None:
    """Score and draw the test scenes (resized to ``size`` first when given) with the network,
    normalization and device of ``draw``."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from dino.data.datasets import builtin_scenes
    from dino.eval.segmentation import score_tensors

    scenes = builtin_scenes(args.data, "test", args.subset)
    images, masks = scenes.images, scenes.masks
    if size and size != images.shape[-1]:
        images = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
        masks = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")
        masks = masks[:, 0].bool()
    result = None
    if args.score:
        tty = sys.stderr.isatty()
        with tqdm(
            total=len(images), desc="scoring", unit="img", leave=False, disable=not tty
        ) as bar:
            result = score_tensors(
                draw.backbone,
                images,
                masks,
                draw.mean,
                draw.std,
                args.batch_size,
                draw.device,
                bar.update,
                args.threshold,
            )
    for i in range(min(n_pictures, len(images))):
        draw.pixels(images[i], f"scene-{i:05d}", masks[i])
    return result


def _folder(
    args: argparse.Namespace, draw: _Drawer, size: int | None, n_pictures: int
) -> dict[str, Any] | None:
    """Score (with --masks) and draw the images of the folder ``--data`` with the network,
    normalization and device of ``draw``."""
    from dino.data.datasets import image_paths
    from dino.eval.attention import attention_patch_size
    from dino.eval.segmentation import folder_pairs, score_folder

    result = None
    if args.masks:
        if args.score:
            result = score_folder(
                draw.backbone,
                args.data,
                args.masks,
                draw.mean,
                draw.std,
                size,
                draw.device,
                args.threshold,
            )
        if n_pictures:
            pairs = folder_pairs(args.data, args.masks, attention_patch_size(draw.backbone), size)
            for path, pix, mask in list(pairs)[:n_pictures]:
                draw.pixels(pix, Path(path).stem, mask)
    elif n_pictures:
        for f in image_paths([args.data])[:n_pictures]:
            draw.file(f, size, f.stem)
    return result


def attention_video(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dino.devices import resolve_device
    from dino.eval.api import run_config_of
    from dino.eval.attention import attention_patch_size
    from dino.viz.attention import default_image_size
    from dino.viz.video import attention_video as write_attention_video

    if args.fps is not None and args.fps <= 0:
        raise DinoError(f"--fps must be positive, got {args.fps}")
    if args.size is not None and args.size < 1:
        raise DinoError(f"--size must be at least 1, got {args.size}")
    output = args.video or f"{Path(args.source).stem}-attention.mp4"
    check_output(output, "--output", "file")
    backbone = load_weights(args)
    attention_patch_size(backbone)  # a convnet stops here, before the video is read
    size = args.size or default_image_size(run_config_of(backbone))
    bars: list[tqdm] = []

    def progress(n: int) -> None:  # the bar starts with the first frame, after the checks
        if not bars:
            bars.append(tqdm(desc="frames", unit=" frames", leave=False, disable=not tty))
        bars[0].update(n)

    tty = sys.stderr.isatty()
    try:
        res = write_attention_video(
            backbone,
            args.source,
            output,
            fps=args.fps,
            size=size,
            mean=args.mean,
            std=args.std,
            device=resolve_device(args.device),
            progress=progress,
        )
    finally:
        for bar in bars:
            bar.close()
    print(f"{res['frames']} frames at {res['fps']:g} fps -> {res['output']}")
    return 0
