"""Reading the files a backbone can come from: a ``dino train`` run folder or checkpoint, a state
dict (ours or the reference code's, full or backbone only), or a published reference model
downloaded once into the torch hub cache; and finding the backbone's tensors in what was read
(wrapper and ``backbone.`` prefixes removed)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from dino.atomic_files import check_intact
from dino.errors import DinoError

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

RUN_CHECKPOINT = "checkpoint.pth"
RUN_BACKBONE = "teacher_backbone.pth"
# prefixes of wrappers around a network: DDP, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


#: The ``weights`` value that asks for an untrained network.
RANDOM = "random"


def read_like(like: str | Path) -> dict[str, Any]:
    """The config of the run folder (or checkpoint) ``like``, for a random network shaped so."""
    path = Path(like)
    folder = path if path.is_dir() else path.parent
    run_config = read_run_yaml(folder / "config.yaml") if folder.is_dir() else None
    if run_config is None:
        raise DinoError(
            f"--like {like}: not a `dino train` run folder (no readable config.yaml); pass the "
            "folder that `dino train` wrote"
        )
    return run_config


def read_weights(weights: str | Path) -> tuple[Path, Any, dict[str, Any] | None]:
    """(file path, loaded object, run config or None) for a path or a reference model name."""
    path = Path(weights)
    if not path.exists():
        name = str(weights)
        if name in REFERENCE_MODELS:
            return download_reference(name)
        known = ", ".join(REFERENCE_MODELS)
        raise DinoError(
            f"{weights} does not exist; pass a `dino train` run folder, a checkpoint file or a "
            f"reference model name ({known})"
        )
    if path.is_dir():
        for name in (RUN_CHECKPOINT, RUN_BACKBONE):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise DinoError(
                f"{path} is a folder without {RUN_CHECKPOINT} or {RUN_BACKBONE}; pass the run "
                "folder that `dino train` wrote, or a checkpoint file"
            )
    obj = torch_load(path)
    run_config = None
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "model" in obj["config"]:
        run_config = obj["config"]
    elif (path.parent / "config.yaml").is_file() and path.name == RUN_BACKBONE:
        run_config = read_run_yaml(path.parent / "config.yaml")
    return path, obj, run_config


def read_run_yaml(path: Path) -> dict[str, Any] | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("model"), dict) else None


def torch_load(path: Path) -> Any:
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


def download_reference(name: str) -> tuple[Path, Any, None]:
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


def strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def backbone_state(
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
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state, changed = strip_prefix(state, prefix), True
    if any(k.startswith("backbone.") for k in state):
        state = strip_prefix(state, "backbone.")
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = strip_prefix(state, prefix)
    elif state and all(k.startswith("head.") for k in state):
        state = {}
    if state and all(k.startswith("net.") for k in state):  # our torchvision trunk wrapper
        state = strip_prefix(state, "net.")
    if not state:
        raise DinoError(
            f"{source} holds no backbone weights (no backbone tensors under "
            f"{key_used or 'its top level'}); pass a DINO checkpoint or backbone state dict"
        )
    return state, key_used
