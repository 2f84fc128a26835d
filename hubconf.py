"""torch.hub entry points: the reference DINO backbones and the runs of this package.

    torch.hub.load(REPO_DIR, "dino_vits16", source="local")                    # reference weights
    torch.hub.load(REPO_DIR, "dino_vits16", source="local", pretrained=False)  # untrained
    torch.hub.load(REPO_DIR, "dino_run", "runs/fmnist", source="local")        # a run folder

Each returns the frozen backbone of :func:`dino.load_backbone` (eval mode): normalized images
``[B, 3, H, W]`` -> features ``[B, D]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

dependencies = ["torch", "torchvision", "timm", "numpy", "PIL", "yaml"]

try:
    import dino
except ImportError:  # a checkout whose package is not installed: use its sources
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    import dino


def _reference(name: str, pretrained: bool, **kwargs: Any) -> Any:
    from dino.models.weight_files import REFERENCE_MODELS

    if pretrained:
        return dino.load_backbone(name, **kwargs)
    spec = REFERENCE_MODELS[name]
    return dino.load_backbone("random", arch=spec["arch"], patch_size=spec["patch_size"], **kwargs)


def dino_vits16(pretrained: bool = True, **kwargs: Any) -> Any:
    """ViT-S/16 of the DINO paper (21M parameters, 384-d features)."""
    return _reference("dino_vits16", pretrained, **kwargs)


def dino_vits8(pretrained: bool = True, **kwargs: Any) -> Any:
    """ViT-S/8 of the DINO paper (21M parameters, 384-d features)."""
    return _reference("dino_vits8", pretrained, **kwargs)


def dino_vitb16(pretrained: bool = True, **kwargs: Any) -> Any:
    """ViT-B/16 of the DINO paper (85M parameters, 768-d features)."""
    return _reference("dino_vitb16", pretrained, **kwargs)


def dino_vitb8(pretrained: bool = True, **kwargs: Any) -> Any:
    """ViT-B/8 of the DINO paper (85M parameters, 768-d features)."""
    return _reference("dino_vitb8", pretrained, **kwargs)


def dino_resnet50(pretrained: bool = True, **kwargs: Any) -> Any:
    """ResNet-50 of the DINO paper (23M parameters, 2048-d features)."""
    return _reference("dino_resnet50", pretrained, **kwargs)


def dino_run(weights: str, **kwargs: Any) -> Any:
    """The backbone of a ``dino train`` run folder or a weights file (what ``--weights`` takes:
    keyword arguments as :func:`dino.load_backbone`'s, e.g. ``checkpoint_key="student"``)."""
    return dino.load_backbone(weights, **kwargs)
