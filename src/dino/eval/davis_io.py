"""DAVIS-2017 files for video segmentation: the folder layout, indexed-PNG masks and their
palette, frames, and the videos of a DAVIS root or of a plain folder of frames, checked before
any network runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dino.data.datasets import IMAGE_EXTENSIONS, BadImage, load_image
from dino.errors import DinoError
from dino.eval.outputs import refuse_existing

#: The DAVIS layout: frames, annotations and the list of validation videos below the root.
DAVIS_FRAMES = Path("JPEGImages") / "480p"
DAVIS_ANNOTATIONS = Path("Annotations") / "480p"
DAVIS_VAL_LIST = Path("ImageSets") / "2017" / "val.txt"
#: Annotation value of pixels not scored in DAVIS ("void"); treated as background.
VOID = 255


# ------------------------------------------------------------------ masks and palettes


def davis_palette() -> np.ndarray:
    """``[256, 3]`` uint8: the colour of each object id in DAVIS PNGs (the PASCAL VOC map:
    the bits of the id are spread over R, G, B from the most significant bit down)."""
    ids = np.arange(256)
    pal = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            pal[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return pal.astype(np.uint8)


def read_mask(path: str | Path) -> np.ndarray:
    """The object ids ``[H, W]`` (uint8, 0 = background) of a mask image.

    Indexed (palette) PNGs give their indices, as DAVIS stores them; greyscale images their
    values, with a black/white mask read as one object; RGB images are mapped through the DAVIS
    palette (and black/white as one object). The void value 255 counts as background.

    Raises:
        DinoError: unreadable file, or an RGB colour that is not in the DAVIS palette.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                ids = np.asarray(im).astype(np.int64)
            elif mode in ("RGB", "RGBA"):
                ids = _ids_of_colours(np.asarray(im.convert("RGB")), path)
            else:
                ids = np.asarray(im.convert("L") if mode not in ("1", "L", "I", "I;16") else im)
                ids = ids.astype(np.int64)
                values = np.unique(ids)
                if mode == "1" or (values.max() == 255 and set(values.tolist()) <= {0, 255}):
                    ids = (ids > 0).astype(np.int64)  # a black/white mask: one object
    except DinoError:
        raise
    except Exception as exc:
        raise DinoError(
            f"cannot read the mask {path} ({exc or type(exc).__name__}); masks are PNG images "
            "whose pixel values (palette indices) are object ids"
        ) from None
    if ids.max() > VOID:
        raise DinoError(
            f"mask {path} has the value {int(ids.max())}; object ids go from 1 to 254 "
            "(0 background, 255 void)"
        )
    ids[ids == VOID] = 0
    return ids.astype(np.uint8)


def _ids_of_colours(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Object ids of an RGB mask painted in the DAVIS colours (or black and white)."""
    codes = (
        (rgb[..., 0].astype(np.int64) << 16)
        | (rgb[..., 1].astype(np.int64) << 8)
        | rgb[..., 2].astype(np.int64)
    )
    colours, inverse = np.unique(codes, return_inverse=True)
    white = (255 << 16) | (255 << 8) | 255
    if set(colours.tolist()) <= {0, white}:
        return (codes == white).astype(np.int64)
    pal = davis_palette().astype(np.int64)
    pal_codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    lookup = {int(c): i for i, c in enumerate(pal_codes)}
    ids = np.empty(len(colours), dtype=np.int64)
    for j, c in enumerate(colours.tolist()):
        if c not in lookup:
            y, x = np.argwhere(codes == c)[0]
            r, g, b = (c >> 16) & 255, (c >> 8) & 255, c & 255
            raise DinoError(
                f"mask {path} has the colour ({r}, {g}, {b}) at pixel (x={x}, y={y}), which is "
                "not a DAVIS palette colour; save masks as indexed (palette) PNGs whose indices "
                "are the object ids, or paint each object in its DAVIS colour"
            )
        ids[j] = lookup[c]
    return ids[inverse.reshape(codes.shape)]


def write_indexed_png(path: str | Path, ids: np.ndarray, palette: np.ndarray) -> None:
    """Save object ids ``[H, W]`` as an indexed PNG with ``palette`` (``[256, 3]`` uint8)."""
    im = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8), mode="P")
    im.putpalette(palette.reshape(-1).tolist())
    im.save(path, format="PNG")


def list_frames(folder: Path) -> list[Path]:
    """The image files of ``folder`` in name order (hidden files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


def load_frame(
    path: Path, size_hw: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """A frame resized (bilinear) to ``size_hw`` and normalized: ``[3, H, W]`` float32."""
    try:
        img = load_image(path)
    except BadImage as exc:
        raise DinoError(f"cannot read the frame {exc}") from None
    img = img.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


@dataclass
class Video:
    """One video to segment: its frames in order, the first frame's mask and, when there is
    one, the folder of ground-truth masks named like the frames (``<frame stem>.png``)."""

    name: str
    frames: list[Path]
    first_mask: Path
    annotations: Path | None


def find_videos(
    data: str | Path, first_mask: str | Path | None = None, annotations: str | Path | None = None
) -> list[Video]:
    """The videos of a DAVIS root (those of ``ImageSets/2017/val.txt``, else every folder of
    ``JPEGImages/480p``) or of a folder of frames with its first-frame mask."""
    root = Path(data)
    if not root.is_dir():
        raise DinoError(
            f"{root} is not a folder; pass --data with a DAVIS root (JPEGImages/480p/<video>/) "
            "or a folder of frames"
        )
    if (root / "JPEGImages").is_dir():
        if first_mask is not None or annotations is not None:
            raise DinoError(
                f"{root} is a DAVIS root, whose masks are read from {DAVIS_ANNOTATIONS}; drop "
                "--first-mask and --annotations (they are for a plain folder of frames)"
            )
        return _davis_videos(root)
    if first_mask is None:
        raise DinoError(
            f"{root} is a folder of frames without a first-frame mask; pass --first-mask with the "
            "mask of its first frame (an indexed PNG of object ids), or point --data at a DAVIS "
            "root"
        )
    frames = list_frames(root)
    if not frames:
        raise DinoError(f"no frames (image files) in {root}; pass a folder of video frames")
    mask = Path(first_mask)
    if not mask.is_file():
        raise DinoError(f"the first-frame mask {mask} does not exist; pass an existing PNG")
    gt = Path(annotations) if annotations is not None else None
    if gt is not None and not gt.is_dir():
        raise DinoError(f"--annotations {gt} is not a folder of ground-truth masks")
    return [Video(root.resolve().name, frames, mask, gt)]


def _davis_videos(root: Path) -> list[Video]:
    frames_root = root / DAVIS_FRAMES
    if not frames_root.is_dir():
        raise DinoError(
            f"{root} has no {DAVIS_FRAMES} folder; the DAVIS layout is "
            "JPEGImages/480p/<video>/*.jpg with Annotations/480p/<video>/00000.png"
        )
    listing = root / DAVIS_VAL_LIST
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not names:
            raise DinoError(f"{listing} lists no video; write one video name per line")
    else:
        names = sorted(p.name for p in frames_root.iterdir() if p.is_dir())
        if not names:
            raise DinoError(f"no video folders in {frames_root}")
    videos = []
    for name in names:
        folder = frames_root / name
        if not folder.is_dir():
            raise DinoError(
                f"{listing} lists the video {name}, but {folder} does not exist; fix the list or "
                "add the frames"
            )
        frames = list_frames(folder)
        if not frames:
            raise DinoError(f"no frames (image files) in {folder}")
        gt = root / DAVIS_ANNOTATIONS / name
        first = gt / f"{frames[0].stem}.png"
        if not first.is_file():
            raise DinoError(
                f"the first-frame mask {first} is missing; the semi-supervised protocol starts "
                "from the first frame's object mask"
            )
        videos.append(Video(name, frames, first, gt))
    return videos


def _image_size(path: Path, what: str) -> tuple[int, int]:
    """``(height, width)`` from the file header."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception as exc:
        raise DinoError(f"cannot read the {what} {path} ({exc or type(exc).__name__})") from None


def check_video(video: Video) -> tuple[int, int]:
    """Validate a video before anything is written: frames of one size, unique names, a
    readable first-frame mask of that size with at least one object, ground truth of that size.
    Returns the frames' ``(height, width)``."""
    size = _image_size(video.frames[0], "frame")
    stems: set[str] = set()
    for frame in video.frames:
        got = _image_size(frame, "frame")
        if got != size:
            raise DinoError(
                f"frame {frame} is {got[1]}x{got[0]} px but the first frame of {video.name} is "
                f"{size[1]}x{size[0]}; all frames of a video must have one size"
            )
        if frame.stem in stems:
            raise DinoError(
                f"two frames of {video.name} are named {frame.stem} (with different extensions); "
                "give every frame its own name"
            )
        stems.add(frame.stem)
    ids = read_mask(video.first_mask)
    if ids.shape != size:
        raise DinoError(
            f"the first-frame mask {video.first_mask} is {ids.shape[1]}x{ids.shape[0]} px but the "
            f"frames of {video.name} are {size[1]}x{size[0]}; the mask must match the frames"
        )
    if not ids.any():
        raise DinoError(
            f"the first-frame mask {video.first_mask} has no object (every pixel is 0 or 255); "
            "mark each object with its id 1, 2, ..."
        )
    if video.annotations is not None:
        for frame in video.frames[1:]:
            gt = video.annotations / f"{frame.stem}.png"
            if gt.is_file() and _image_size(gt, "ground-truth mask") != size:
                got = _image_size(gt, "ground-truth mask")
                raise DinoError(
                    f"the ground-truth mask {gt} is {got[1]}x{got[0]} px but the frames of "
                    f"{video.name} are {size[1]}x{size[0]}; it must match its frame"
                )
    return size


def check_output(output: Path, videos: list[Video], json_out: str | Path | None) -> None:
    """Refuse to write over an earlier run's masks or results."""
    for video in videos:
        folder = output / video.name
        if folder.is_dir() and any(folder.iterdir()):
            raise DinoError(
                f"{folder} already holds masks of an earlier run; pass another --output, or "
                "move that folder away first"
            )
        if folder.exists() and not folder.is_dir():
            raise DinoError(f"{folder} exists and is not a folder; pass another --output")
    refuse_existing(json_out, "--json")
