"""Attention videos: the [CLS] attention of every frame of a video (or a folder of frames), as a
video file, like the reference's ``video_generation.py``.

Frames are read and written with imageio (``pip install 'dino[video]'``): videos through its
PyAV plugin (FFmpeg's decoders), ``.mp4`` written with H.264 through PyAV, ``.gif`` through
Pillow. Each output frame shows, side by side, the input frame, the mean of the heads' attention
and each head's attention as heat maps.

>>> from dino import load_backbone
>>> from dino.viz.video import attention_video
>>> model = load_backbone("dino_vits8")  # doctest: +SKIP
>>> attention_video(model, "clip.mp4", "clip-attention.mp4", size=320)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dino.data.datasets import BadImage, image_paths, load_image
from dino.errors import DinoError
from dino.eval.attention import attention_patch_size, cls_attention
from dino.models.weights import input_stats
from dino.viz.drawing import colorize, prepare_image, upsample

#: Output formats by file extension.
VIDEO_FORMATS = (".mp4", ".gif")
#: Frames per second of a folder of frames, when not given.
FOLDER_FPS = 10.0


def _imageio() -> Any:
    try:
        import imageio.v3 as iio
    except ImportError:
        raise DinoError(
            "attention videos need imageio and PyAV; install them with pip install 'dino[video]'"
        ) from None
    return iio


def read_frames(source: str | Path) -> tuple[Iterator[Image.Image], float | None]:
    """The frames of a video file or of a folder of images (sorted by name), and the video's
    frames per second (None for a folder). Raises :class:`DinoError` with one sentence when the
    video cannot be decoded."""
    src = Path(source)
    if not src.exists():
        raise DinoError(f"{src} does not exist; pass a video file or a folder of frames")
    if src.is_dir():
        files = image_paths([src])

        def folder() -> Iterator[Image.Image]:
            for f in files:
                try:
                    yield load_image(f)
                except BadImage as exc:
                    raise DinoError(f"cannot read the frame {exc}; fix or remove it") from None

        return folder(), None
    iio = _imageio()
    try:
        meta = iio.immeta(src, plugin="pyav")
        fps = float(meta["fps"]) if meta.get("fps") else None
        frames = iio.imiter(src, plugin="pyav")
        first = next(frames)
    except StopIteration:
        raise DinoError(f"{src} holds no video frame; pass a video with frames") from None
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DinoError(
            f"cannot decode {src} as a video ({reason}); pass a video file FFmpeg reads "
            "(mp4, webm, avi, gif ...) or a folder of frames"
        ) from None

    def video() -> Iterator[Image.Image]:
        yield Image.fromarray(np.asarray(first)).convert("RGB")
        try:
            for frame in frames:
                yield Image.fromarray(np.asarray(frame)).convert("RGB")
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DinoError(
                f"cannot decode a frame of {src} ({reason}); the file may be truncated or corrupt"
            ) from None

    return video(), fps


def write_video(frames: Iterable[np.ndarray], path: str | Path, fps: float) -> int:
    """Write ``uint8 [H, W, 3]`` frames to ``path`` (``.mp4``: H.264; ``.gif``); returns the
    number of frames. The file is first written beside ``path`` under a temporary name and
    renamed at the end, so a failure never leaves a half-written or clobbered file."""
    out = Path(path)
    if out.suffix.lower() not in VIDEO_FORMATS:
        raise DinoError(f"{out}: unknown video format {out.suffix!r}; name the output .mp4 or .gif")
    if fps <= 0:
        raise DinoError(f"--fps must be positive, got {fps}")
    iio = _imageio()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    count = 0
    try:
        if out.suffix.lower() == ".gif":
            arrays = [np.asarray(f, dtype=np.uint8) for f in frames]
            count = len(arrays)
            if count:
                duration = 1000.0 / fps
                iio.imwrite(tmp, np.stack(arrays), plugin="pillow", duration=duration, loop=0)
        else:
            with iio.imopen(tmp, "w", plugin="pyav") as f:
                f.init_video_stream("libx264", fps=fps)
                for frame in frames:
                    arr = np.asarray(frame, dtype=np.uint8)
                    h, w = arr.shape[:2]
                    f.write_frame(arr[: h - h % 2, : w - w % 2])  # H.264 wants even sides
                    count += 1
        if count == 0:
            raise DinoError("no frame to write; the input holds no frame")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def attention_frame(model: nn.Module, picture: Image.Image, x: torch.Tensor) -> np.ndarray:
    """One output frame: the picture | mean attention | each head's attention, side by side."""
    att = cls_attention(model, x)[0].float().cpu().numpy()
    size = picture.size
    panels = [np.asarray(picture)]
    panels.append(colorize(upsample(att.mean(0), size)))
    panels += [colorize(upsample(a, size)) for a in att]
    gap = np.full((size[1], 2, 3), 255, dtype=np.uint8)
    row = []
    for p in panels:
        row += [p, gap]
    return np.concatenate(row[:-1], axis=1)


def attention_video(
    model: nn.Module,
    source: str | Path,
    output: str | Path,
    fps: float | None = None,
    size: int | None = None,
    mean: Iterable[float] | None = None,
    std: Iterable[float] | None = None,
    device: str | torch.device = "cpu",
    progress: Any = None,
) -> dict[str, Any]:
    """Write the attention video of a video file or folder of frames to ``output``.

    Args:
        model: a ViT backbone (:func:`dino.load_backbone`).
        source: a video file or a folder of frames.
        output: ``.mp4`` or ``.gif``; an existing file is replaced only once the new one is
            complete.
        fps: frames per second of the output (default: the video's, or 10 for a folder).
        size: resize each frame's shorter side to this first (None: keep the size); frames are
            then center-cropped to multiples of the patch size.
        mean, std: input normalization (default: the model's ``weights_info`` or ImageNet).
        device: where to run the model.
        progress: called with 1 after each frame.
    """
    patch = attention_patch_size(model)  # a convnet stops here, before anything is read
    run_mean, run_std = input_stats(model)
    mean, std = list(mean or run_mean), list(std or run_std)
    out = Path(output)
    if out.suffix.lower() not in VIDEO_FORMATS:
        raise DinoError(f"{out}: unknown video format {out.suffix!r}; name the output .mp4 or .gif")
    frames, source_fps = read_frames(source)
    rate = fps or source_fps or FOLDER_FPS

    def rendered() -> Iterator[np.ndarray]:
        for picture in frames:
            x, cropped = prepare_image(picture, patch, size, mean, std)
            with torch.no_grad():
                yield attention_frame(model, cropped, x.to(device))
            if progress is not None:
                progress(1)

    count = write_video(rendered(), out, rate)
    return {"output": out, "frames": count, "fps": rate}
