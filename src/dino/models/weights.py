"""Load a trained backbone from any checkpoint format DINO produces, ours or the reference code's.

:func:`load_backbone` accepts

* a ``dino train`` run folder, or its ``checkpoint.pth`` (architecture read from the saved config;
  the teacher by default, the student with ``checkpoint_key="student"``);
* our ``teacher_backbone.pth`` (a plain state dict of the backbone);
* the reference implementation's *backbone only* files (a plain ViT or ResNet state dict) and its
  *full* checkpoints (``student`` / ``teacher`` dicts whose keys carry ``module.`` and
  ``backbone.`` / ``head.`` prefixes);
* the name of a published reference model (``weight_files.REFERENCE_MODELS``), downloaded
  once into the torch hub cache.

The reference ViT uses timm's parameter names (``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1`` ...),
so adapting a foreign file is a key-prefix filter plus shape checks. When no architecture is
given it is read from the tensor shapes: embedding dim (-> ViT size), patch size, number of blocks
and the positional-embedding grid (-> image size); ResNets from their layer counts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino.errors import DinoError
from dino.imagenet import IMAGENET_MEAN, IMAGENET_STD
from dino.models.arch_detect import build_from_spec, random_spec, resolve_arch
from dino.models.backbones import VIT_SIZES, canonical_arch
from dino.models.vit import resample_pos_embed
from dino.models.weight_files import (
    RANDOM,
    backbone_state,
    read_like,
    read_weights,
    strip_prefix,
)

_CLASSIFIER = re.compile(r"(head|fc|classifier)\.")


@dataclass
class WeightsInfo:
    """Where a loaded backbone came from and how it was built.

    ``run_config`` is the ``Config.to_dict()`` of the ``dino train`` run that wrote the weights
    (None for other files); evaluation reads its ``data`` section for the input transform.
    """

    source: str
    arch: str
    patch_size: int | None
    depth: int | None
    img_size: int | None
    checkpoint_key: str | None
    embed_dim: int
    run_config: dict[str, Any] | None = None
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)


def config_stats(run_config: dict[str, Any] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalization (mean, std) of a ``dino train`` run's config: its ``data`` section's,
    else ImageNet's."""
    data = (run_config or {}).get("data") or {}
    return tuple(data.get("mean", IMAGENET_MEAN)), tuple(data.get("std", IMAGENET_STD))


def input_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalization (mean, std) of a backbone: that of the run or file it was loaded
    from (its ``weights_info``), else ImageNet's."""
    info = getattr(model, "weights_info", None)
    if info is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(info.mean or IMAGENET_MEAN), tuple(info.std or IMAGENET_STD)


def load_backbone(
    weights: str | Path,
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str = "teacher",
    device: str | torch.device = "cpu",
    like: str | Path | None = None,
    seed: int = 0,
) -> nn.Module:
    """Load a frozen backbone in eval mode: ``[B, 3, H, W]`` normalized images -> ``[B, D]``.

    Args:
        weights: a run folder, a checkpoint or state-dict file (ours or the reference code's),
            a reference model name (``REFERENCE_MODELS``, downloaded once), or ``random``:
            the untrained network (architecture from ``arch``/``patch_size`` or from the run
            ``like``), the baseline every comparison needs.
        arch: the architecture (``vit_small``, ``tv:resnet50``, a timm name ...); by default
            read from the run config or detected from the tensor shapes. When given for a ViT
            size, it is checked against the file.
        patch_size: ViT patch size; by default detected. When given, it is checked against the
            file.
        checkpoint_key: which network of a full checkpoint: ``teacher`` (the one DINO evaluates)
            or ``student``.
        device: where to put the model.
        like: with ``weights="random"``: a run folder whose architecture (and input statistics
            and crop sizes, for evaluation) the random network takes.
        seed: with ``weights="random"``: the seed of the initialization.

    The returned module has ``embed_dim`` and ``weights_info`` (a :class:`WeightsInfo`). ViTs
    are timm ``VisionTransformer`` instances, so ``forward_intermediates`` and the blocks are
    available for the linear probe and the attention maps. Loading pickled checkpoints runs
    their code: only load files you trust.

    Raises:
        DinoError: missing, unreadable or truncated file; no backbone in it; shapes that do not
            match the requested architecture.
    """
    arch = canonical_arch(arch) if arch else arch
    if str(weights) == RANDOM:
        run_config = read_like(like) if like else None
        spec = random_spec(arch, patch_size, run_config)
        spec["arch"] = canonical_arch(spec["arch"])
        source, key_used = RANDOM, None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_from_spec(spec, source)
    else:
        path, obj, run_config = read_weights(weights)
        source = str(path)
        state, key_used = backbone_state(obj, source, checkpoint_key)
        spec = resolve_arch(state, source, arch, patch_size, run_config)
        spec["arch"] = canonical_arch(spec["arch"])
        model = build_from_spec(spec, source)
        _load_into(model, state, source, spec["arch"])
    model.eval().requires_grad_(False)
    model.to(device)
    mean, std = config_stats(run_config)
    vit_like = hasattr(model, "patch_embed") and hasattr(model, "blocks")
    model.weights_info = WeightsInfo(
        source=source,
        arch=spec["arch"],
        patch_size=int(model.patch_embed.patch_size[0]) if vit_like else None,
        depth=len(model.blocks) if vit_like else None,
        img_size=spec.get("img_size") if vit_like else None,
        checkpoint_key=key_used,
        embed_dim=int(model.embed_dim),
        run_config=run_config,
        mean=mean,
        std=std,
    )
    return model


def _misfit(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str | None:
    """Why the tensors ``state`` do not fit a network whose state dict is ``own`` (the first
    mismatched, missing or unexpected tensor and the counts), or None when they fit."""
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if not (mismatched or missing or unexpected):
        return None
    if mismatched:
        k = mismatched[0]
        first = f"shape mismatch at {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
    else:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
    counts = f"{len(mismatched)} mismatched, {len(missing)} missing, {len(unexpected)} unexpected"
    return f"{first}; {counts}"


def _without_classifier(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` less a classifier saved with the backbone (not part of the feature extractor)."""
    return {k: v for k, v in state.items() if k in own or not _CLASSIFIER.match(k)}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    target = model.net if hasattr(model, "net") and arch.startswith("tv:") else model
    own = target.state_dict()
    state = _without_classifier(state, own)
    misfit = _misfit(state, own)
    if misfit:
        raise DinoError(
            f"{source} does not fit a {arch} backbone ({misfit}); pass the --arch and "
            "--patch-size it was trained with, or drop them to detect them"
        )
    target.load_state_dict(state, strict=True)


# ------------------------------------------------------------------ starting a run from weights


def init_backbone(backbone: nn.Module, init: str, arch: str, patch_size: int | None = None) -> str:
    """Copy pretrained weights into a freshly built training backbone (``--init``), in place.

    Args:
        backbone: the network :func:`~dino.models.backbones.build_backbone` built for ``arch``.
        init: anything :func:`load_backbone` accepts (a published name such as ``dino_vits16``,
            a run folder, a checkpoint or state-dict file), or ``timm:<name>`` for the
            pretrained weights timm downloads for that model (``timm:resnet50.a1_in1k``).
        arch: the run's architecture; the weights must be of the same one.
        patch_size: the run's ViT patch size (checked against the weights for our ViT sizes).

    A ViT's positional embedding is bicubic-resampled to the run's patch grid when the weights
    were trained at another image size (224 for the published models). Returns a one-line
    description of what was loaded, for the log.

    Raises:
        DinoError: unreadable or missing weights, or weights of another architecture.
    """
    arch = canonical_arch(arch)
    if init.startswith("timm:"):
        state = _timm_pretrained_state(init[5:])
    else:
        loaded = load_backbone(
            init, arch=arch, patch_size=patch_size if arch in VIT_SIZES else None
        )
        state = loaded.state_dict()
    target = getattr(backbone, "net", backbone) if arch.startswith("tv:") else backbone
    if state and all(k.startswith("net.") for k in state) and target is not backbone:
        state = strip_prefix(state, "net.")
    own = target.state_dict()
    state = _without_classifier(state, own)
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        state["pos_embed"] = _resample_pos_embed(pos, target)
    misfit = _misfit(state, own)
    if misfit:
        raise DinoError(
            f"--init {init} does not fit the {arch} backbone of this run ({misfit} "
            "tensors); pass the --arch, --patch-size and --depth the weights were trained with"
        )
    target.load_state_dict(state, strict=True)
    return f"backbone initialized from {init} ({len(state)} tensors)"


def _timm_pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """The backbone tensors of timm's pretrained ``name`` (classifier removed)."""
    import timm

    if not timm.is_model(name.split(".", 1)[0]):
        raise DinoError(f"--init timm:{name}: timm has no model {name!r}; see timm.list_models()")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DinoError(
            f"could not get timm's pretrained weights of {name} ({reason}); check the name "
            "(timm.list_pretrained()) and the network, or download the weights yourself and "
            "pass the file"
        ) from None
    return model.state_dict()


def _resample_pos_embed(pos: torch.Tensor, target: nn.Module) -> torch.Tensor:
    """A ViT positional embedding ``[1, prefix + G*G, D]`` resampled to the patch grid of
    ``target`` as the network itself resamples it (:func:`dino.models.vit.resample_pos_embed`)."""
    prefix = 0 if getattr(target, "no_embed_class", False) else int(target.num_prefix_tokens)
    grid = math.isqrt(pos.shape[1] - prefix)
    if grid * grid != pos.shape[1] - prefix:
        raise DinoError(
            f"cannot resample a positional embedding of {pos.shape[1]} tokens (not a square "
            "grid); train at the image size of the --init weights"
        )
    new = tuple(int(s) for s in target.patch_embed.grid_size)
    with torch.no_grad():
        return resample_pos_embed(pos.float(), new, (grid, grid), prefix).to(pos.dtype)
