"""A contact sheet of labeled images: each new image, then the bank images nearest to it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from dino.atomic_files import atomic_write

#: The side of each image on the sheet, and the caption strip above it.
CELL = 96
CAPTION = 14


def contact_sheet(
    examples: Sequence[dict[str, Any]],
    open_picture: Callable[[str], Image.Image],
    neighbours: int = 5,
) -> Image.Image:
    """One row per example of :func:`dino.eval.classify.classify_images`' ``examples``: the new
    image captioned with its predicted label, then its ``neighbours`` nearest bank images
    captioned with their similarity."""
    cols = 1 + min(neighbours, max((len(e["neighbours"]) for e in examples), default=0))
    step_x, step_y = CELL + 4, CELL + CAPTION + 4
    sheet = Image.new("RGB", (cols * step_x + 4, len(examples) * step_y + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for r, ex in enumerate(examples):
        cells = [(ex["file"], ex["label"])]
        cells += [(name, f"{sim:.3f}") for name, sim in ex["neighbours"][:neighbours]]
        for c, (name, caption) in enumerate(cells):
            x, y = 4 + c * step_x, 4 + r * step_y
            img = open_picture(name).convert("RGB")
            sheet.paste(img.resize((CELL, CELL), Image.Resampling.NEAREST), (x, y + CAPTION))
            draw.text((x + 1, y), caption[:16], fill=(200, 0, 0) if c == 0 else (0, 0, 0))
    return sheet


def save_sheet(sheet: Image.Image, path: str | Path) -> None:
    """Write the sheet as a PNG, atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: sheet.save(f, format="PNG"))
