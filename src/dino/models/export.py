"""Export a trained backbone for use outside this package: safetensors for timm, and ONNX.

:func:`export_backbone` writes into one folder:

* ``model.safetensors``: the backbone's tensors under timm's parameter names;
* ``config.json``: a timm model config (``architecture``, ``model_args``, ``pretrained_cfg`` with
  the input size and normalization) plus a ``dino`` section saying where the weights came from
  and how to load them. The folder loads in timm either way::

      timm.create_model("local-dir:EXPORT_DIR", pretrained=True, num_classes=0)
      timm.create_model(name, pretrained=True, num_classes=0, **model_args,
                        pretrained_cfg_overlay=dict(file="EXPORT_DIR/model.safetensors"))

  where ``name`` is ``architecture`` and ``model_args`` the config's keyword arguments. Our ViT
  sizes map to timm's ViTs: ViT-S/16 is ``vit_small_patch16_224``, with ``img_size`` the size
  it was trained at (always written: it sets the grid of the saved positional embedding); the
  sizes timm does not name (``vit_pico``, ``vit_nano``, patch 4, depth 6 ...) are
  ``vit_small_patch16_224`` with ``embed_dim``, ``num_heads``, ``depth``, ``patch_size`` and
  ``img_size`` overridden. ``dynamic_img_size: true`` lets the timm model
  take any multiple of the patch size, as ours does. Timm backbones keep their name;
  torchvision ResNets (``tv:resnet50`` ...) are timm's ResNets of the same name (same layers,
  same parameter names). Other torchvision models get no timm name: load the safetensors into
  ``torchvision.models.get_model(name)`` with ``strict=False`` (its classifier is not saved);
* ``model.onnx``: the backbone as an ONNX graph, input ``images`` ``[batch, 3, S, S]`` (the batch
  is dynamic, the image size fixed at export) and output ``features`` ``[batch, D]``. When
  onnxruntime is installed the export is checked: onnxruntime and PyTorch must agree within 1e-4
  (relative to the features' magnitude) on a batch of a size other than the export's.

>>> from dino.models.export import export_backbone
>>> export_backbone("runs/fmnist", "exported/")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino.atomic_files import write_json
from dino.errors import DinoError
from dino.models.backbones import VIT_SIZES
from dino.models.weights import WeightsInfo, input_stats, load_backbone

log = logging.getLogger("dino")

#: torchvision models whose timm namesake has the same layers and parameter names.
TIMM_EQUAL_TORCHVISION = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
#: The timm ViT whose keyword arguments are overridden for the ViT sizes timm does not name.
GENERIC_TIMM_VIT = "vit_small_patch16_224"
#: Largest accepted ``|onnxruntime - torch|``, relative to ``max(1, max |features|)``.
ONNX_TOLERANCE = 1e-4


def timm_spec(model: nn.Module, info: WeightsInfo) -> tuple[str, dict[str, Any]] | None:
    """``(timm model name, keyword arguments)`` that rebuild ``model`` in timm, or None."""
    import timm

    arch = info.arch
    if arch in VIT_SIZES:
        dim, heads = VIT_SIZES[arch]
        patch = int(model.patch_embed.patch_size[0])
        depth = len(model.blocks)
        img = int(model.patch_embed.img_size[0])
        name = f"{arch}_patch{patch}_224"
        kwargs: dict[str, Any] = {}
        if depth != 12 or not timm.is_model(name):
            name = GENERIC_TIMM_VIT
            kwargs = {"embed_dim": dim, "num_heads": heads, "depth": depth, "patch_size": patch}
        # always named: timm would otherwise size the positional embedding from the config's
        # input_size (the evaluation crop) and resample the saved one to it
        kwargs["img_size"] = img
        kwargs["dynamic_img_size"] = True
        if getattr(model, "reg_token", None) is not None:  # register tokens (--registers)
            kwargs.update(reg_tokens=int(model.reg_token.shape[1]), no_embed_class=True)
        return name, kwargs
    if arch.startswith("tv:"):
        name = arch[3:]
        return (name, {}) if name in TIMM_EQUAL_TORCHVISION else None
    name = arch.removeprefix("timm:")
    kwargs = {}
    embed = getattr(model, "patch_embed", None)
    if getattr(model, "pos_embed", None) is not None and getattr(embed, "img_size", None):
        kwargs["img_size"] = int(embed.img_size[0])  # the grid of the saved positional embedding
    if getattr(model, "dynamic_img_size", False):
        kwargs["dynamic_img_size"] = True
    return name, kwargs


def _state(model: nn.Module, info: WeightsInfo) -> dict[str, torch.Tensor]:
    """The backbone's tensors under the names of the exported model (no wrapper prefix)."""
    target = model.net if info.arch.startswith("tv:") and hasattr(model, "net") else model
    return {k: v.detach().cpu().contiguous() for k, v in target.state_dict().items()}


def default_size(model: nn.Module, info: WeightsInfo) -> int:
    """The image side the backbone is evaluated at: the run's eval crop, else its own size."""
    data = (info.run_config or {}).get("data") or {}
    if data.get("eval_crop"):
        return int(data["eval_crop"])
    return int(info.img_size or 224)


def _fixed_size_copy(model: nn.Module, size: int) -> nn.Module:
    """A copy of a timm ViT that takes ``size`` x ``size`` images only: its positional embedding
    resampled once to that grid (as the dynamic model would at every call), so that the graph
    has no resampling in it (ONNX has no antialiased bicubic resize)."""
    m = copy.deepcopy(model)
    if not getattr(m, "dynamic_img_size", False) or getattr(m, "pos_embed", None) is None:
        return m
    from timm.layers import resample_abs_pos_embed

    pe = m.patch_embed
    p = int(pe.patch_size[0])
    grid = (size // p, size // p)
    prefix = 0 if getattr(m, "no_embed_class", False) else int(m.num_prefix_tokens)
    with torch.no_grad():
        pos = resample_abs_pos_embed(
            m.pos_embed, new_size=grid, old_size=pe.grid_size, num_prefix_tokens=prefix
        )
    m.pos_embed = nn.Parameter(pos, requires_grad=False)
    pe.img_size, pe.grid_size, pe.num_patches = (size, size), grid, grid[0] * grid[1]
    pe.flatten = True  # tokens as [B, N, C], the layout the fixed-size path expects
    m.dynamic_img_size = False
    return m


def _onnx_export(model: nn.Module, size: int, path: Path, opset: int) -> None:
    example = torch.randn(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["images"],
                output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DinoError(
                f"ONNX export failed ({reason}); try another --opset, or export with --no-onnx "
                "and convert the safetensors yourself"
            ) from None


def check_onnx(path: Path, model: nn.Module, size: int, batch: int = 3) -> float | None:
    """Largest ``|onnxruntime - torch|`` of the features of a random batch (None without
    onnxruntime); a DinoError beyond :data:`ONNX_TOLERANCE`."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed: the ONNX file was not checked")
        return None
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
    with torch.no_grad():
        want = model(x).float()
    diff = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not diff <= ONNX_TOLERANCE * scale:
        raise DinoError(
            f"onnxruntime's features differ from PyTorch's by {diff:.3g} (tolerance "
            f"{ONNX_TOLERANCE * scale:.3g}); the ONNX file is not faithful, please report this"
        )
    return diff


def check_timm(output_dir: Path, model: nn.Module, size: int) -> float:
    """Largest ``|timm - ours|`` of the features of a random batch, loading the export the way
    ``config.json`` documents; a DinoError beyond 1e-4 (relative)."""
    import timm

    try:
        loaded = timm.create_model(f"local-dir:{output_dir}", pretrained=True, num_classes=0)
    except Exception as exc:
        raise DinoError(f"timm cannot load the export in {output_dir} ({exc})") from None
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x).float(), loaded.eval()(x).float()
    if got.shape != want.shape:
        raise DinoError(f"timm's model gives features {tuple(got.shape)}, ours {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if not diff <= ONNX_TOLERANCE * max(1.0, float(want.abs().max())):
        raise DinoError(f"timm's model differs from ours by {diff:.3g}; please report this")
    return diff


def export_backbone(
    weights: nn.Module | str | Path,
    output_dir: str | Path,
    image_size: int | None = None,
    onnx: bool = True,
    opset: int = 17,
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str = "teacher",
    verify: bool = True,
) -> dict[str, Any]:
    """Write a backbone as ``model.safetensors`` + ``config.json`` (timm) and ``model.onnx``.

    Args:
        weights: a backbone from :func:`dino.load_backbone`, or anything it accepts (a run
            folder exports the teacher backbone).
        output_dir: created if needed; existing files of the same names are replaced.
        image_size: side of the ONNX input and of ``pretrained_cfg.input_size`` (default: the
            run's ``eval_crop``, else the backbone's training size, else 224). ViTs need a
            multiple of the patch size.
        onnx: also write ``model.onnx`` (needs the ``onnx`` package).
        opset: ONNX opset version.
        arch, patch_size, checkpoint_key: passed to :func:`dino.load_backbone`.
        verify: load the export back with timm (and onnxruntime when installed) and compare
            the features with the backbone's; a DinoError when they differ.

    Returns what ``config.json`` says, with the paths written under ``files``.
    """
    if isinstance(weights, nn.Module):
        model = weights
        if not isinstance(getattr(model, "weights_info", None), WeightsInfo):
            raise DinoError("export needs a backbone from dino.load_backbone (or its weights)")
    else:
        model = load_backbone(weights, arch, patch_size, checkpoint_key)
    model = model.cpu().eval()
    info: WeightsInfo = model.weights_info
    size = int(image_size or default_size(model, info))
    if info.patch_size and size % info.patch_size:
        raise DinoError(
            f"--image-size {size} is not a multiple of the patch size {info.patch_size}; pass "
            "one that is"
        )
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = _state(model, info)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    spec = timm_spec(model, info)
    data = (info.run_config or {}).get("data") or {}
    resize = int(data.get("eval_resize") or round(size / 0.875))
    pretrained_cfg = {
        "input_size": [3, size, size],
        "interpolation": "bicubic",
        "crop_pct": round(size / resize, 4),
        "crop_mode": "center",
        "mean": list(input_stats(model)[0]),
        "std": list(input_stats(model)[1]),
        "num_classes": 0,
        # a ViT exported without dynamic_img_size takes its training size only
        "fixed_input_size": bool(
            info.patch_size and not (spec and spec[1].get("dynamic_img_size"))
        ),
    }
    config: dict[str, Any] = {}
    dino_section: dict[str, Any] = {
        "source": info.source,
        "arch": info.arch,
        "checkpoint_key": info.checkpoint_key,
        "patch_size": info.patch_size,
        "depth": info.depth,
        "img_size": info.img_size,
        "embed_dim": info.embed_dim,
        "weights": "model.safetensors",
    }
    if spec is not None:
        name, kwargs = spec
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        config = {
            "architecture": name,
            "num_classes": 0,
            "num_features": int(info.embed_dim),
            "model_args": kwargs,
            "pretrained_cfg": pretrained_cfg,
        }
        dino_section["timm"] = {
            "name": name,
            "kwargs": kwargs,
            "load": f"timm.create_model('local-dir:{out}', pretrained=True, num_classes=0)",
            "load_with_overlay": (
                f"timm.create_model({name!r}, pretrained=True, num_classes=0{args}, "
                f"pretrained_cfg_overlay=dict(file='{out / 'model.safetensors'}'))"
            ),
        }
    else:
        tv_name = info.arch.removeprefix("tv:")
        dino_section["timm"] = None
        dino_section["torchvision"] = {
            "name": tv_name,
            "load": f"torchvision.models.get_model({tv_name!r}).load_state_dict("
            "safetensors.torch.load_file('model.safetensors'), strict=False)",
        }
        config["pretrained_cfg"] = pretrained_cfg
    files = {"safetensors": str(out / "model.safetensors"), "config": str(out / "config.json")}
    if onnx:
        path = out / "model.onnx"
        _onnx_export(_fixed_size_copy(model, size), size, path, opset)
        files["onnx"] = str(path)
        dino_section["onnx"] = {
            "file": "model.onnx",
            "input": "images",
            "input_shape": ["batch", 3, size, size],
            "output": "features",
            "output_shape": ["batch", int(info.embed_dim)],
            "opset": opset,
        }
    config["dino"] = dino_section
    write_json(out / "config.json", config)
    if verify:
        if spec is not None:
            dino_section["timm"]["max_abs_diff"] = check_timm(out, model, size)
        if onnx:
            dino_section["onnx"]["max_abs_diff"] = check_onnx(out / "model.onnx", model, size)
        write_json(out / "config.json", config)
    return {**config, "files": files}
