"""Photos for the retrieval and copy-detection tests: scikit-image's sample images, shrunk, and
the transformations that make copies of them (JPEG re-encoding, centre crops)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: Colour photos: the images to find again.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
#: Grey photos: the distractors.
GREYS = ("camera", "brick", "coins", "moon", "grass", "gravel", "clock", "text")


def photo(name: str, size: int = 112) -> Image.Image:
    """The RGB scikit-image sample ``name`` (grey ones as three equal channels), its longer side
    shrunk to ``size``. Callers skip the test first when scikit-image is missing."""
    from skimage import data

    a = getattr(data, name)()
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    im = Image.fromarray(a[..., :3].astype(np.uint8))
    im.thumbnail((size, size))
    return im


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    """``im`` after a round trip through JPEG at ``quality``."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def crop(im: Image.Image, frac: float) -> Image.Image:
    """The centre ``frac`` of ``im``'s width and height."""
    w, h = im.size
    cw, ch = int(w * frac), int(h * frac)
    return im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
