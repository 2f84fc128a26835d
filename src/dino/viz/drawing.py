"""Drawing with PIL and numpy, shared by every picture of ``dino.viz``: images prepared for a ViT,
heat-map colors, patch grids upsampled to a picture, masks tinted over it, titled panels and
sheets of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dino.errors import DinoError
from dino.eval.attention import resized_to_patches

#: Anchor colors of the heat-map color scale (dark blue -> purple -> orange -> light yellow).
HEAT_COLORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
#: Colors of the heads in the mask overlay.
HEAD_COLORS = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
    ],
    dtype=np.float64,
)


#: The most patches an image may have for its attention maps: 128 x 128, e.g. 2048 px with
#: 16-px patches (each block then holds a 16384 x 16384 attention matrix per head).
MAX_PATCHES = 16384


def prepare_image(
    image: Image.Image,
    patch_size: int,
    image_size: int | None,
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
) -> tuple[torch.Tensor, Image.Image]:
    """Resize the shorter side to ``image_size`` (None: keep the size), center-crop to multiples
    of the patch size; returns the normalized tensor ``[1, 3, H, W]`` and the cropped picture."""
    img = image.convert("RGB")
    size, box = resized_to_patches(img, patch_size, image_size, "the image after resizing")
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    w, h = size
    cw, ch = box[2] - box[0], box[3] - box[1]
    tokens = (cw // patch_size) * (ch // patch_size)
    if tokens > MAX_PATCHES:
        raise DinoError(
            f"the image ({w}x{h} after resizing) makes {tokens} patches of {patch_size} px, "
            f"more than the {MAX_PATCHES} attention maps are drawn for (every block's attention "
            "grows with their square); pass a smaller --image-size, such as 480"
        )
    img = img.crop(box)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s)[None], img


def colorize(values: np.ndarray) -> np.ndarray:
    """Map a 2-D array to ``uint8 [h, w, 3]`` colors, scaled to its own min..max."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    t = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    pos = t * (len(HEAT_COLORS) - 1)
    i = np.clip(np.floor(pos).astype(int), 0, len(HEAT_COLORS) - 2)
    f = (pos - i)[..., None]
    rgb = HEAT_COLORS[i] * (1 - f) + HEAT_COLORS[i + 1] * f
    return np.round(rgb).astype(np.uint8)


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a patch grid to the picture's ``(width, height)``."""
    w, h = size
    rows = np.minimum((np.arange(h) * grid.shape[0]) // h, grid.shape[0] - 1)
    cols = np.minimum((np.arange(w) * grid.shape[1]) // w, grid.shape[1] - 1)
    return grid[rows][:, cols]


def overlay(picture: Image.Image, masks: np.ndarray) -> Image.Image:
    """The picture with each head's mask tinted in that head's color."""
    base = np.asarray(picture, dtype=np.float64)
    up = np.stack([upsample(m.astype(np.float64), picture.size) for m in masks])  # [H, h, w]
    colors = HEAD_COLORS[np.arange(len(masks)) % len(HEAD_COLORS)]
    count = up.sum(0)
    tint = np.einsum("khw,kc->hwc", up, colors) / np.maximum(count, 1)[..., None]
    alpha = 0.55 * (count > 0)[..., None]
    out = base * (1 - alpha) + tint * alpha
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def panel(img: Image.Image, title: str, height: int) -> Image.Image:
    """``img`` scaled (nearest) to ``height`` px under a one-line ``title``."""
    w, h = img.size
    width = max(1, round(w * height / h))
    body = img.resize((width, height), Image.Resampling.NEAREST)
    panel = Image.new("RGB", (max(width, 60), height + 14), (255, 255, 255))
    panel.paste(body, (0, 14))
    ImageDraw.Draw(panel).text((2, 1), title, fill=(0, 0, 0))
    return panel


def sheet(panels: list[list[Image.Image]], pad: int = 4) -> Image.Image:
    """One white sheet of rows of panels, ``pad`` px apart and from the edges."""
    width = max(sum(p.width for p in row) + pad * (len(row) + 1) for row in panels)
    height = sum(max(p.height for p in row) + pad for row in panels) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    y = pad
    for row in panels:
        x = pad
        for p in row:
            sheet.paste(p, (x, y))
            x += p.width + pad
        y += max(p.height for p in row) + pad
    return sheet


def save_head_maps(
    out: Path, picture: Image.Image, attention: np.ndarray, masks: Sequence[Image.Image]
) -> list[Path]:
    """Write ``image.png``, each head's heat map ``attn-head<h>.png`` and mask
    ``mask-head<h>.png``, and ``attn-mean.png`` into the folder ``out`` (created); the paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = [("image.png", picture)]
    for h, (att, mask) in enumerate(zip(attention, masks, strict=True)):
        files.append((f"attn-head{h}.png", Image.fromarray(colorize(upsample(att, picture.size)))))
        files.append((f"mask-head{h}.png", mask))
    mean = Image.fromarray(colorize(upsample(attention.mean(0), picture.size)))
    files.append(("attn-mean.png", mean))
    for name, img in files:
        img.save(out / name)
    return [out / name for name, _ in files]


def titled_rows(rows: list[list[tuple[Image.Image, str]]], height: int = 96) -> Image.Image:
    """A sheet of rows of (picture, title) panels of ``height`` px."""
    return sheet([[panel(p.convert("RGB"), t, height) for p, t in row] for row in rows])


def contact_sheet(
    pictures: list[Image.Image], titles: list[str], columns: int = 8, height: int = 96
) -> Image.Image:
    """The pictures as titled panels of ``height`` px, ``columns`` to a row."""
    items = list(zip(pictures, titles, strict=True))
    return titled_rows([items[i : i + columns] for i in range(0, len(items), columns)], height)


def neighbours_sheet(
    examples: Sequence[dict], open_picture: Callable[[str], Image.Image], neighbours: int = 5
) -> Image.Image:
    """One row per example of :func:`dino.eval.classify.classify_images`' ``examples``: the new
    image titled with its predicted label, then its ``neighbours`` nearest bank images titled
    with their similarity."""
    rows = []
    for ex in examples:
        row = [(open_picture(ex["file"]), str(ex["label"])[:16])]
        row += [(open_picture(name), f"{sim:.3f}") for name, sim in ex["neighbours"][:neighbours]]
        rows.append(row)
    return titled_rows(rows)
