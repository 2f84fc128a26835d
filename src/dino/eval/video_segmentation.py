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
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from dino.data.datasets import IMAGE_EXTENSIONS, BadImage, load_image
from dino.errors import DinoError
from dino.eval.davis_scores import boundary_f, jaccard, summarize
from dino.eval.outputs import Backbone, refuse_existing, resolve_backbone, write_json
from dino.eval.patch_features import cls_and_patch_tokens, vit_patch_size
from dino.imagenet import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("dino")

#: The DAVIS layout: frames, annotations and the list of validation videos below the root.
DAVIS_FRAMES = Path("JPEGImages") / "480p"
DAVIS_ANNOTATIONS = Path("Annotations") / "480p"
DAVIS_VAL_LIST = Path("ImageSets") / "2017" / "val.txt"
#: Temperature of the label votes' weights ``exp(sim / T)`` (fixed in the reference).
TEMPERATURE = 0.1
#: Annotation value of pixels not scored in DAVIS ("void"); treated as background.
VOID = 255
#: The reference rounds the longer side of the working frame down to a multiple of this.
_LONG_SIDE_STEP = 64

#: A function from a normalized frame ``[3, H, W]`` to its patch features ``[h, w, D]``.
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TrackSettings:
    """The propagation's parameters (defaults: the paper's)."""

    n_last_frames: int = 7
    topk: int = 5
    size_mask_neighborhood: int = 12
    size: int = 480

    def check(self) -> None:
        if self.n_last_frames < 0:
            raise DinoError(f"--n-last-frames must be 0 or more, got {self.n_last_frames}")
        if self.topk < 1:
            raise DinoError(f"--topk must be at least 1, got {self.topk}")
        if self.size_mask_neighborhood < 0:
            raise DinoError(
                f"--size-mask-neighborhood must be 0 (no restriction) or more, got "
                f"{self.size_mask_neighborhood}"
            )
        if self.size < 1:
            raise DinoError(f"--size must be a positive number of pixels, got {self.size}")


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


# ------------------------------------------------------------------ frames


def working_size(height: int, width: int, size: int, patch: int) -> tuple[int, int]:
    """``(height, width)`` a frame is resized to: the shorter side ``size`` (rounded down to a
    multiple of the patch size), the longer side in proportion rounded down to a multiple of 64
    (of the patch size when it does not divide 64), as the reference does."""
    short = max(patch, size - size % patch)
    step = _LONG_SIDE_STEP if _LONG_SIDE_STEP % patch == 0 else patch
    if height > width:
        long_side = int(size * height / width // step * step)
    else:
        long_side = int(size * width / height // step * step)
    long_side = max(patch, long_side - long_side % patch)
    return (long_side, short) if height > width else (short, long_side)


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


def mask_to_labels(ids: np.ndarray, n_objects: int, grid: tuple[int, int]) -> torch.Tensor:
    """One-hot labels ``[n_objects + 1, h * w]`` of a mask resized (nearest) to the patch grid."""
    h, w = grid
    small = np.asarray(Image.fromarray(ids).resize((w, h), Image.Resampling.NEAREST))
    small = torch.from_numpy(small.astype(np.int64)).clamp_(max=n_objects)
    return F.one_hot(small.reshape(-1), n_objects + 1).T.float()


def labels_to_ids(
    labels: torch.Tensor, grid: tuple[int, int], patch: int, size_hw: tuple[int, int]
) -> np.ndarray:
    """Object ids ``[H, W]`` (uint8) of soft patch labels ``[C, h * w]``: bilinear upsampling by
    the patch size, each channel min-max normalized, argmax, nearest resize to ``size_hw``."""
    c = labels.shape[0]
    soft = labels.float().reshape(1, c, *grid)
    up = F.interpolate(soft, scale_factor=patch, mode="bilinear", align_corners=False)[0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    scaled = torch.where(span > 0, (up - lo) / span.clamp_min(1e-12), torch.ones_like(up))
    up = torch.where(hi > 0, scaled, up)
    ids = up.argmax(dim=0).to(torch.uint8).cpu().numpy()
    if ids.shape != tuple(size_hw):
        ids = np.asarray(
            Image.fromarray(ids).resize((size_hw[1], size_hw[0]), Image.Resampling.NEAREST)
        )
    return ids


# ------------------------------------------------------------------ label propagation


def propagate(
    target: torch.Tensor,
    sources: torch.Tensor,
    source_labels: torch.Tensor,
    grid: tuple[int, int],
    topk: int = 5,
    radius: int = 12,
    temperature: float = TEMPERATURE,
    chunk_elems: int = 1 << 24,
) -> torch.Tensor:
    """Labels ``[C, N]`` of the ``N = h * w`` target patches voted by their nearest sources.

    Args:
        target: L2-normalized target patch features ``[N, D]``.
        sources: L2-normalized features of the context frames ``[S, N, D]``.
        source_labels: their (soft) labels ``[S, C, N]``.
        grid: the patch grid ``(h, w)`` shared by all frames.
        topk: neighbours per target patch, over all context frames together.
        radius: sources must lie within this many patches (in x and in y) of the target
            patch's position; 0: anywhere.
        temperature: the votes' weights are ``softmax(sim / temperature)`` over the top k.
        chunk_elems: target patches are processed in blocks of at most this many similarities.
    """
    s, n, _d = sources.shape
    c = source_labels.shape[1]
    keys = sources.reshape(s * n, -1)
    values = source_labels.permute(1, 0, 2).reshape(c, s * n)
    k = min(topk, s * n)
    h, w = grid
    rows = torch.arange(n, device=target.device) // w
    cols = torch.arange(n, device=target.device) % w
    out = torch.empty(c, n, dtype=values.dtype, device=values.device)
    step = max(1, chunk_elems // (s * n))
    for start in range(0, n, step):
        stop = min(n, start + step)
        sim = target[start:stop] @ keys.T  # [b, S * N]
        if radius > 0:
            near = ((rows[start:stop, None] - rows[None]).abs() <= radius) & (
                (cols[start:stop, None] - cols[None]).abs() <= radius
            )  # [b, N]
            sim = sim.view(stop - start, s, n).masked_fill_(~near[:, None], float("-inf"))
            sim = sim.view(stop - start, s * n)
        top, idx = sim.topk(k, dim=1)
        weights = torch.softmax(top / temperature, dim=1)  # [b, k]
        out[:, start:stop] = (values[:, idx] * weights.to(values.dtype)).sum(-1)
    return out


class LabelPropagation:
    """The context of one video: the first frame and the last ``n_last_frames`` frames, each
    as (normalized patch features, labels). Calling it on a frame's features returns the frame's
    soft labels and pushes the frame into the context."""

    def __init__(
        self,
        first_features: torch.Tensor,
        first_labels: torch.Tensor,
        grid: tuple[int, int],
        settings: TrackSettings,
    ) -> None:
        self.grid, self.settings = grid, settings
        self.first = (F.normalize(first_features.float(), dim=1), first_labels.float())
        self.recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=settings.n_last_frames)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(features.float(), dim=1)
        context = [self.first, *self.recent]
        labels = propagate(
            feats,
            torch.stack([f for f, _ in context]),
            torch.stack([lab.to(feats.device) for _, lab in context]),
            self.grid,
            self.settings.topk,
            self.settings.size_mask_neighborhood,
        )
        self.recent.append((feats, labels))
        return labels


# ------------------------------------------------------------------ videos


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
    mean = tuple(info.mean) if info else IMAGENET_MEAN
    std = tuple(info.std) if info else IMAGENET_STD
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
