"""``dino export``: a backbone for timm (safetensors + config.json) and ONNX."""

from __future__ import annotations

import argparse
from typing import Any

from dino.cli.flags import add_weights_flags


def register(sub: Any) -> None:
    x = sub.add_parser(
        "export",
        help="write a backbone as safetensors + config.json for timm, and ONNX",
        description="Export a backbone (a run's teacher by default): model.safetensors and a "
        "timm config.json, so that timm.create_model('local-dir:DIR', pretrained=True, "
        "num_classes=0) loads it, and model.onnx (dynamic batch, fixed image size). Both are "
        "loaded back and compared with the backbone (onnxruntime when installed).",
    )
    add_weights_flags(x, positional=True)
    x.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder for model.safetensors, config.json and model.onnx (created if needed)",
    )
    x.add_argument(
        "--format",
        default="timm",
        choices=["timm", "hf"],
        help="timm: model.safetensors + timm config.json (+ model.onnx); hf: a Hugging Face "
        "transformers folder that AutoModel.from_pretrained(DIR) loads (ViTModel, or "
        "Dinov2WithRegistersModel for ViTs with registers; pooler_output is the feature). "
        "Default: timm",
    )
    x.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="PX",
        help="input side of the ONNX graph and of the timm config (default: the run's "
        "--eval-crop, else the backbone's training size, else 224); a multiple of the patch size",
    )
    x.add_argument(
        "--onnx",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --format timm: also write model.onnx (default: yes; needs `pip install onnx`)",
    )
    x.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    x.add_argument(
        "--no-check",
        action="store_true",
        help="skip loading the export back with timm and onnxruntime to compare the features",
    )
    x.set_defaults(run=export)


def export(args: argparse.Namespace) -> int:
    from dino.models.export import export_backbone

    weights: Any = args.weights
    if args.like or weights == "random" or args.format == "hf":
        from dino.cli.flags import load_weights

        if args.format == "hf":
            from dino.models.hf_export import transformers_module

            transformers_module()
        weights = load_weights(args)
    if args.format == "hf":
        return export_hf_folder(args, weights)
    res = export_backbone(
        weights,
        args.output,
        image_size=args.image_size,
        onnx=args.onnx,
        opset=args.opset,
        arch=args.arch,
        patch_size=args.patch_size,
        checkpoint_key=args.checkpoint_key,
        verify=not args.no_check,
    )
    info, files = res["dino"], res["files"]
    print(f"{info['arch']} backbone ({info['embed_dim']}-d features) from {info['source']}")
    print(f"weights -> {files['safetensors']}, config -> {files['config']}")
    if info.get("timm"):
        t = info["timm"]
        checked = f" (checked: max |diff| {t['max_abs_diff']:.2g})" if "max_abs_diff" in t else ""
        print(f"timm: {t['load']}{checked}")
        print(f"  or: {t['load_with_overlay']}")
    else:
        print(f"no timm equivalent; torchvision: {info['torchvision']['load']}")
    if "onnx" in files:
        o = info["onnx"]
        diff = o.get("max_abs_diff")
        checked = f" (onnxruntime max |diff| {diff:.2g})" if diff is not None else ""
        print(f"ONNX -> {files['onnx']}: images {o['input_shape']} -> features{checked}")
    return 0


def export_hf_folder(args: argparse.Namespace, model: Any) -> int:
    """``--format hf``: the transformers folder."""
    from dino.models.export import default_size
    from dino.models.hf_export import export_hf

    size = int(args.image_size or default_size(model, model.weights_info))
    res = export_hf(model.cpu(), args.output, size, verify=not args.no_check)
    info = model.weights_info
    print(f"{info.arch} backbone from {info.source} -> {res['model_type']} in {args.output}")
    checked = f" (checked: max |diff| {res['max_abs_diff']:.2g})" if "max_abs_diff" in res else ""
    print(f"transformers.AutoModel.from_pretrained({str(args.output)!r}).pooler_output{checked}")
    return 0
