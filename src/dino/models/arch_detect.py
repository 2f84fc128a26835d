"""Which network a backbone's weights need: from the run config, explicit flags, or the tensor
shapes (embedding dim -> ViT size, patch size, number of blocks and the positional-embedding grid
-> image size; ResNets from their layer counts), and building it."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from dino.errors import DinoError
from dino.models.backbones import VIT_SIZES, build_backbone

#: torchvision ResNets by (block kind, blocks per stage).
_RESNETS: dict[tuple[str, tuple[int, ...]], str] = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


def run_spec(run_config: dict[str, Any]) -> dict[str, Any]:
    """How a run's config builds its network: the model section and the global crop size."""
    m = run_config.get("model", {})
    return {
        "arch": m.get("arch"),
        "patch_size": m.get("patch_size"),
        "depth": m.get("depth"),
        "img_size": run_config.get("data", {}).get("global_size"),
        "registers": m.get("registers", 0),
    }


def random_spec(
    arch: str | None, patch_size: int | None, run_config: dict[str, Any] | None
) -> dict[str, Any]:
    """How to build the untrained network: the run ``like``'s model, then explicit flags."""
    spec: dict[str, Any] = {}
    if run_config is not None:
        spec = run_spec(run_config)
    if arch is not None:
        spec["arch"] = arch
    if patch_size is not None:
        spec["patch_size"] = patch_size
    if not spec.get("arch"):
        raise DinoError(
            "--weights random needs an architecture: pass --arch (and --patch-size for a ViT), "
            "or --like RUN to take a run's"
        )
    return spec


def detect_arch(state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Architecture of a backbone state dict from its tensor shapes, or None if unknown.

    ViTs: ``{"arch", "patch_size", "depth", "img_size", "embed_dim", "registers"}`` (register
    tokens: ``reg_token``, and then no positional embedding for [CLS]); torchvision ResNets:
    ``{"arch": "tv:resnetNN"}``.
    """
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        dim = int(state["cls_token"].shape[-1])
        names = [n for n, (d, _h) in VIT_SIZES.items() if d == dim]
        proj = state["patch_embed.proj.weight"]
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
        out: dict[str, Any] = {
            "arch": names[0] if names else None,
            "embed_dim": dim,
            "patch_size": int(proj.shape[-1]),
            "patch_h": int(proj.shape[-2]),
            "depth": max(blocks) + 1 if blocks else 0,
            "img_size": None,
            "registers": int(state["reg_token"].shape[1]) if "reg_token" in state else 0,
        }
        if "pos_embed" in state:
            n = int(state["pos_embed"].shape[1]) - (0 if out["registers"] else 1)
            grid = math.isqrt(max(n, 0))
            if grid * grid == n and grid > 0:
                out["img_size"] = grid * out["patch_size"]
        return out
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
        counts = []
        for stage in range(1, 5):
            ids = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
            counts.append(max(ids) + 1 if ids else 0)
        name = _RESNETS.get((kind, tuple(counts)))
        if name and state["layer1.0.conv1.weight"].shape[0] == 128 and name == "resnet50":
            name = "wide_resnet50_2"
        return {"arch": f"tv:{name}"} if name else None
    return None


def resolve_arch(
    state: dict[str, torch.Tensor],
    source: str,
    arch: str | None,
    patch_size: int | None,
    run_config: dict[str, Any] | None,
) -> dict[str, Any]:
    """How to build the network: explicit arguments, else the run config, else the shapes."""
    found = detect_arch(state)
    spec: dict[str, Any] = {}
    if run_config is not None:
        spec = run_spec(run_config)
    elif found is not None:
        spec = dict(found)
    if found is not None and found.get("embed_dim"):
        # the file's own shapes are the truth for a ViT of ours or the reference's
        spec.update({k: found[k] for k in ("depth", "img_size", "registers") if found.get(k)})
    if arch is not None:
        if arch in VIT_SIZES and found is not None and found.get("embed_dim"):
            dim = VIT_SIZES[arch][0]
            if dim != found["embed_dim"]:
                have = found["arch"] or f"a ViT of width {found['embed_dim']}"
                raise DinoError(
                    f"{source} holds {have} (embedding dim {found['embed_dim']}), not the "
                    f"requested {arch} (dim {dim}); drop --arch or pass the matching one"
                )
        elif (
            arch not in VIT_SIZES
            and found is not None
            and found.get("arch")
            and found["arch"] != arch
            and arch.startswith("tv:")
        ):
            raise DinoError(
                f"{source} holds a {found['arch']} backbone, not the requested {arch}; drop "
                "--arch or pass the matching one"
            )
        spec["arch"] = arch
    if patch_size is not None:
        if found is not None and found.get("patch_size") and found["patch_size"] != patch_size:
            raise DinoError(
                f"{source} holds a ViT with patch size {found['patch_size']}, not the requested "
                f"{patch_size}; drop --patch-size or pass {found['patch_size']}"
            )
        spec["patch_size"] = patch_size
    if not spec.get("arch"):
        if found is not None and found.get("embed_dim"):
            raise DinoError(
                f"{source} holds a ViT of embedding dim {found['embed_dim']}, which is none of "
                f"{', '.join(VIT_SIZES)}; pass --arch with a timm model name that matches it"
            )
        raise DinoError(
            f"cannot tell the architecture of {source} from its tensors; pass --arch (and "
            "--patch-size for a ViT)"
        )
    if found is not None and found.get("embed_dim") and found["patch_h"] != found["patch_size"]:
        raise DinoError(f"{source} holds a ViT with non-square patches, which is not supported")
    return spec


def build_from_spec(spec: dict[str, Any], source: str) -> nn.Module:
    arch = spec["arch"]
    try:
        if arch in VIT_SIZES:
            patch = int(spec.get("patch_size") or 16)
            img = int(spec.get("img_size") or 224)
            img = max(patch, img - img % patch)
            depth, registers = int(spec.get("depth") or 12), int(spec.get("registers") or 0)
            return build_backbone(arch, patch, img, depth, registers=registers)
        return build_backbone(arch)
    except DinoError as exc:
        raise DinoError(f"cannot build the backbone of {source}: {exc}") from None
