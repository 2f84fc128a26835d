"""Sheets of pictures: titled panels laid out in rows on one white image (attention maps,
segmentations, contact sheets of clusters and duplicate groups)."""

from __future__ import annotations

from PIL import Image, ImageDraw


def panel(img: Image.Image, title: str, height: int) -> Image.Image:
    """``img`` scaled to ``height`` px (nearest neighbour) under a one-line ``title``."""
    w, h = img.size
    width = max(1, round(w * height / h))
    body = img.resize((width, height), Image.Resampling.NEAREST)
    out = Image.new("RGB", (max(width, 60), height + 14), (255, 255, 255))
    out.paste(body, (0, 14))
    ImageDraw.Draw(out).text((2, 1), title, fill=(0, 0, 0))
    return out


def sheet(panels: list[list[Image.Image]], pad: int = 4) -> Image.Image:
    """One white sheet of rows of panels, ``pad`` px apart and from the edges."""
    width = max(sum(p.width for p in row) + pad * (len(row) + 1) for row in panels)
    height = sum(max(p.height for p in row) + pad for row in panels) + pad
    out = Image.new("RGB", (width, height), (255, 255, 255))
    y = pad
    for row in panels:
        x = pad
        for p in row:
            out.paste(p, (x, y))
            x += p.width + pad
        y += max(p.height for p in row) + pad
    return out


def titled_rows(rows: list[list[tuple[Image.Image, str]]], height: int = 96) -> Image.Image:
    """A sheet of rows of (picture, title) panels of ``height`` px."""
    return sheet([[panel(p.convert("RGB"), t, height) for p, t in row] for row in rows])


def contact_sheet(
    pictures: list[Image.Image], titles: list[str], columns: int = 8, height: int = 96
) -> Image.Image:
    """The pictures as titled panels of ``height`` px, ``columns`` to a row."""
    items = list(zip(pictures, titles, strict=True))
    return titled_rows([items[i : i + columns] for i in range(0, len(items), columns)], height)
