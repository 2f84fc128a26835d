"""dino: DINO self-supervised pretraining (Caron et al., 2021) as a library and a command.

>>> import dino
>>> cfg = dino.load_config("fashion-mnist", {"epochs": 1})
>>> results = dino.train(cfg)  # doctest: +SKIP
>>> backbone = dino.load_backbone("dino_vits16")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from dino.config import Config, load_config
from dino.errors import DinoError

__all__ = ["Config", "DinoError", "load_backbone", "load_config", "train"]
__version__ = "0.1.0"


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Run DINO pretraining (see :func:`dino.training.loop.train`)."""
    from dino.training.loop import train as _train

    return _train(cfg, resume)


def __getattr__(name: str) -> Any:
    # imported on first use: ``import dino`` stays light (no torch import)
    if name == "load_backbone":
        from dino.models.weights import load_backbone

        return load_backbone
    raise AttributeError(f"module 'dino' has no attribute {name!r}")
