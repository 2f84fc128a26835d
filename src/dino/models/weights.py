"""Load a trained backbone from any checkpoint format DINO produces, ours or the reference code's.

:func:`load_backbone` accepts

* a ``dino train`` run folder, or its ``checkpoint.pth`` (architecture read from the saved config;
  the teacher by default, the student with ``checkpoint_key="student"``);
* our ``teacher_backbone.pth`` (a plain state dict of the backbone);
* the reference implementation's *backbone only* files (a plain ViT or ResNet state dict) and its
  *full* checkpoints (``student`` / ``teacher`` dicts whose keys carry ``module.`` and
  ``backbone.`` / ``head.`` prefixes);
* the name of a published reference model (:data:`REFERENCE_MODELS`), downloaded once into the
  torch hub cache.

The reference ViT uses timm's parameter names (``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1`` ...),
so adapting a foreign file is a key-prefix filter plus shape checks. When no architecture is
given it is read from the tensor shapes: embedding dim (-> ViT size), patch size, number of blocks
and the positional-embedding grid (-> image size); ResNets from their layer counts.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino.atomic_files import check_intact
from dino.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from dino.errors import DinoError
from dino.models.backbones import VIT_SIZES, build_backbone

#: The published reference backbones: name -> download URL, architecture and input statistics.
REFERENCE_MODELS: dict[str, dict[str, Any]] = {
    "dino_vits16": {
        "url": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
        "dino_deitsmall16_pretrain.pth",
        "arch": "vit_small",
        "patch_size": 16,
    },
    "dino_vits8": {
        "url": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/"
        "dino_deitsmall8_pretrain.pth",
        "arch": "vit_small",
        "patch_size": 8,
    },
    "dino_vitb16": {
        "url": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
        "dino_vitbase16_pretrain.pth",
        "arch": "vit_base",
        "patch_size": 16,
    },
    "dino_vitb8": {
        "url": "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/"
        "dino_vitbase8_pretrain.pth",
        "arch": "vit_base",
        "patch_size": 8,
    },
    "dino_resnet50": {
        "url": "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/"
        "dino_resnet50_pretrain.pth",
        "arch": "tv:resnet50",
        "patch_size": None,
    },
}

#: torchvision ResNets by (block kind, blocks per stage).
_RESNETS: dict[tuple[str, tuple[int, ...]], str] = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}

_RUN_CHECKPOINT = "checkpoint.pth"
_RUN_BACKBONE = "teacher_backbone.pth"
# prefixes of wrappers around a network: DDP, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
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
            a reference model name (:data:`REFERENCE_MODELS`, downloaded once), or ``random``:
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
    if str(weights) == RANDOM:
        run_config = _read_like(like) if like else None
        spec = _random_spec(arch, patch_size, run_config)
        source, key_used = RANDOM, None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build(spec, source)
    else:
        path, obj, run_config = _read(weights)
        source = str(path)
        state, key_used = _backbone_state(obj, source, checkpoint_key)
        spec = _resolve_arch(state, source, arch, patch_size, run_config)
        model = _build(spec, source)
        _load_into(model, state, source, spec["arch"])
    model.eval().requires_grad_(False)
    model.to(device)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if run_config is not None:
        data = run_config.get("data", {})
        mean = tuple(data.get("mean", mean))
        std = tuple(data.get("std", std))
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


# ------------------------------------------------------------------ reading files

#: The ``weights`` value that asks for an untrained network.
RANDOM = "random"


def _read_like(like: str | Path) -> dict[str, Any]:
    """The config of the run folder (or checkpoint) ``like``, for a random network shaped so."""
    path = Path(like)
    folder = path if path.is_dir() else path.parent
    run_config = _read_run_yaml(folder / "config.yaml") if folder.is_dir() else None
    if run_config is None:
        raise DinoError(
            f"--like {like}: not a `dino train` run folder (no readable config.yaml); pass the "
            "folder that `dino train` wrote"
        )
    return run_config


def _run_spec(run_config: dict[str, Any]) -> dict[str, Any]:
    """How a run's config builds its network: the model section and the global crop size."""
    m = run_config.get("model", {})
    return {
        "arch": m.get("arch"),
        "patch_size": m.get("patch_size"),
        "depth": m.get("depth"),
        "img_size": run_config.get("data", {}).get("global_size"),
        "registers": m.get("registers", 0),
    }


def _random_spec(
    arch: str | None, patch_size: int | None, run_config: dict[str, Any] | None
) -> dict[str, Any]:
    """How to build the untrained network: the run ``like``'s model, then explicit flags."""
    spec: dict[str, Any] = {}
    if run_config is not None:
        spec = _run_spec(run_config)
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


def _read(weights: str | Path) -> tuple[Path, Any, dict[str, Any] | None]:
    """(file path, loaded object, run config or None) for a path or a reference model name."""
    path = Path(weights)
    if not path.exists():
        name = str(weights)
        if name in REFERENCE_MODELS:
            return _download(name)
        known = ", ".join(REFERENCE_MODELS)
        raise DinoError(
            f"{weights} does not exist; pass a `dino train` run folder, a checkpoint file or a "
            f"reference model name ({known})"
        )
    if path.is_dir():
        for name in (_RUN_CHECKPOINT, _RUN_BACKBONE):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise DinoError(
                f"{path} is a folder without {_RUN_CHECKPOINT} or {_RUN_BACKBONE}; pass the run "
                "folder that `dino train` wrote, or a checkpoint file"
            )
    obj = _torch_load(path)
    run_config = None
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "model" in obj["config"]:
        run_config = obj["config"]
    elif (path.parent / "config.yaml").is_file() and path.name == _RUN_BACKBONE:
        run_config = _read_run_yaml(path.parent / "config.yaml")
    return path, obj, run_config


def _read_run_yaml(path: Path) -> dict[str, Any] | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("model"), dict) else None


def _torch_load(path: Path) -> Any:
    check_intact(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Full checkpoints hold non-tensor objects (the reference's argparse namespace,
            # our RNG states); those need the full unpickler.
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, not a torch file, unreadable ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DinoError(
            f"{path} is not a readable PyTorch checkpoint ({reason}); it may be truncated or "
            "corrupt, copy or download it again"
        ) from None


def _download(name: str) -> tuple[Path, Any, None]:
    spec = REFERENCE_MODELS[name]
    url = spec["url"]

    def fetch(weights_only: bool) -> Any:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=True, weights_only=weights_only
        )

    try:
        try:
            state = fetch(weights_only=True)
        except pickle.UnpicklingError:  # a file with non-tensor objects, from the official URL
            state = fetch(weights_only=False)
    except Exception as exc:
        raise DinoError(
            f"could not download the reference model {name} from {url} ({exc}); check the "
            "network, or download the file yourself and pass its path"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return cached, state, None


# ------------------------------------------------------------------ finding the backbone


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _backbone_state(
    obj: Any, source: str, checkpoint_key: str
) -> tuple[dict[str, torch.Tensor], str | None]:
    """The backbone's tensors of a loaded file, with wrapper prefixes removed."""
    if not isinstance(obj, dict):
        raise DinoError(
            f"{source} holds a {type(obj).__name__}, not a checkpoint or state dict; pass a "
            "DINO checkpoint or backbone state dict"
        )
    key_used = None
    nets = [k for k in ("teacher", "student") if isinstance(obj.get(k), dict)]
    if nets:
        if checkpoint_key not in obj or not isinstance(obj[checkpoint_key], dict):
            raise DinoError(
                f"{source} has no {checkpoint_key!r} network (it has {', '.join(nets)}); pass "
                f"--checkpoint-key {nets[0]}"
            )
        state, key_used = obj[checkpoint_key], checkpoint_key
    else:
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        state = obj
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed:  # peel DDP / torch.compile wrappers in any order
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state, changed = _strip(state, prefix), True
    if any(k.startswith("backbone.") for k in state):
        state = _strip(state, "backbone.")
        for prefix in _WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = _strip(state, prefix)
    elif state and all(k.startswith("head.") for k in state):
        state = {}
    if state and all(k.startswith("net.") for k in state):  # our torchvision trunk wrapper
        state = _strip(state, "net.")
    if not state:
        raise DinoError(
            f"{source} holds no backbone weights (no backbone tensors under "
            f"{key_used or 'its top level'}); pass a DINO checkpoint or backbone state dict"
        )
    return state, key_used


# ------------------------------------------------------------------ the architecture


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


def _resolve_arch(
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
        spec = _run_spec(run_config)
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


def _build(spec: dict[str, Any], source: str) -> nn.Module:
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


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    target = model.net if hasattr(model, "net") and arch.startswith("tv:") else model
    own = target.state_dict()
    # a classifier saved with the backbone is not part of the feature extractor
    state = {k: v for k, v in state.items() if k in own or not _CLASSIFIER.match(k)}
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        detail = (
            f"shape mismatch at {mismatched[0]}"
            if mismatched
            else f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
        )
        counts = (
            f"{len(mismatched)} mismatched, {len(missing)} missing, {len(unexpected)} unexpected"
        )
        raise DinoError(
            f"{source} does not fit a {arch} backbone ({detail}; {counts}); pass the --arch and "
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
    if init.startswith("timm:"):
        state = _timm_pretrained_state(init[5:])
    else:
        loaded = load_backbone(
            init, arch=arch, patch_size=patch_size if arch in VIT_SIZES else None
        )
        state = loaded.state_dict()
    target = getattr(backbone, "net", backbone) if arch.startswith("tv:") else backbone
    if state and all(k.startswith("net.") for k in state) and target is not backbone:
        state = _strip(state, "net.")
    own = target.state_dict()
    state = {k: v for k, v in state.items() if k in own or not _CLASSIFIER.match(k)}
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        state["pos_embed"] = _resample_pos_embed(pos, target)
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        first = (
            f"shape mismatch at {mismatched[0]}: {tuple(state[mismatched[0]].shape)} vs "
            f"{tuple(own[mismatched[0]].shape)}"
            if mismatched
            else f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
        )
        raise DinoError(
            f"--init {init} does not fit the {arch} backbone of this run ({first}; "
            f"{len(mismatched)} mismatched, {len(missing)} missing, {len(unexpected)} unexpected "
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
    """A ViT positional embedding ``[1, prefix + G*G, D]`` bicubic-resampled to the patch grid
    of ``target``."""
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(target, "no_embed_class", False) else int(target.num_prefix_tokens)
    grid = math.isqrt(pos.shape[1] - prefix)
    if grid * grid != pos.shape[1] - prefix:
        raise DinoError(
            f"cannot resample a positional embedding of {pos.shape[1]} tokens (not a square "
            "grid); train at the image size of the --init weights"
        )
    new = tuple(int(s) for s in target.patch_embed.grid_size)
    with torch.no_grad():
        return resample_abs_pos_embed(
            pos.float(), new_size=new, old_size=(grid, grid), num_prefix_tokens=prefix
        ).to(pos.dtype)
