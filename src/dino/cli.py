"""The ``dino`` command line. ``dino <command> --help`` documents every flag.

Errors a user can fix end in one line ``dino: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Callable
from typing import Any

from dino.config import leaf_fields, list_presets, load_config, load_yaml
from dino.errors import DinoError

DEFAULT_PRESET = "fashion-mnist"


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field, named after it, with the field's help text."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (section, f, typ) in leaf_fields().items():
        group = groups.setdefault(section, p.add_argument_group(f"{section} settings"))
        default = (
            f.default
            if f.default_factory is typing.cast(Any, None) or not callable(f.default_factory)
            else f.default_factory()
        )
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": name}
        if typing.get_origin(typ) is list:
            kwargs["nargs"] = "+"
            kwargs["metavar"] = typing.get_args(typ)[0].__name__.upper()
        else:
            kwargs["metavar"] = typ.__name__.upper()
        group.add_argument(
            f"--{name.replace('_', '-')}",
            help=f"{f.metadata['help']} (default: {default})",
            **kwargs,
        )


def _cmd_train(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from dino.training.loop import train

    launch_dir = ""
    if args.resume:
        from pathlib import Path

        run_dir = Path(args.resume)
        if run_dir.is_file():  # a checkpoint file of a run folder
            run_dir = run_dir.parent
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.exists():
            raise DinoError(
                f"{args.resume} is not a run folder (no config.yaml); pass the folder "
                "that `dino train` wrote"
            )
        cfg = load_config(str(cfg_path), overrides)
        launch_dir = str(run_dir)
    else:
        preset = args.config
        if preset is None:
            data = overrides.get("data", "fashion-mnist")
            preset = DEFAULT_PRESET if data == "fashion-mnist" else "default"
        cfg = load_config(preset, overrides)
    if args.nproc is not None and args.nproc != 1:
        if args.nproc < 1:
            raise DinoError(f"--nproc must be at least 1, got {args.nproc}")
        from dino.training.distributed import default_run_dir, launch, split_nproc

        worker_argv = split_nproc(args.argv)
        if not launch_dir:
            launch_dir = cfg.run.output_dir
        if not launch_dir:  # chosen here, so that every process uses the same folder
            launch_dir = default_run_dir()
            worker_argv += ["--output-dir", launch_dir]
        return launch(args.nproc, worker_argv, launch_dir)
    results = train(cfg, resume=args.resume)
    knn = results.get("knn") if results else None
    if knn:
        print("\nweighted k-NN (teacher [CLS] features)")
        print(f"{'k':>5} {'top-1':>7} {'top-5':>7}")
        for k, v in knn.items():
            print(f"{k:>5} {v['top1']:7.2f} {v['top5']:7.2f}")
    return 0


def _cmd_config(args: argparse.Namespace, _overrides: dict[str, Any]) -> int:
    if args.action == "list" or not args.name:
        print("\n".join(list_presets()))
        return 0
    from pathlib import Path

    import yaml

    from dino.config import PRESET_DIR

    cfg = load_config(args.name)
    path = Path(args.name)
    if not path.is_file():
        path = PRESET_DIR / f"{args.name}.yaml"
    try:  # the file itself, so that its comments (each value's source) show
        preset = path.read_text()
    except OSError:
        preset = yaml.safe_dump(load_yaml(args.name), sort_keys=False)
    print(f"# preset {args.name}: what it sets ({path})\n" + preset)
    print("# the full config it gives\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def _cmd_check_data(args: argparse.Namespace, _overrides: dict[str, Any]) -> int:
    from tqdm import tqdm

    from dino.data.check import check_folder

    with tqdm(desc="checking images", unit=" files", disable=not sys.stderr.isatty()) as bar:
        report = check_folder(args.path, args.workers, bar.update)
    for path, reason in report.bad:
        print(f"unreadable: {path}: {reason}")
    print(report.summary())
    if args.output:
        from pathlib import Path

        Path(args.output).write_text("".join(f"{path}\n" for path, _ in report.bad))
        print(f"list of unreadable files -> {args.output}")
    return 0 if report.ok else 1


# ---------------------------------------------------------------- evaluation commands


def _add_weights_flags(p: argparse.ArgumentParser, positional: bool = False) -> None:
    g = p.add_argument_group("weights")
    g.add_argument(
        *(["weights"] if positional else ["--weights"]),
        **({} if positional else {"required": True}),
        metavar="RUN|FILE|NAME",
        help="a `dino train` run folder, a checkpoint or state-dict file (ours or the reference "
        "code's), or a reference model name: dino_vits16, dino_vits8, dino_vitb16, dino_vitb8, "
        "dino_resnet50 (downloaded once into the torch hub cache)",
    )
    g.add_argument(
        "--arch",
        default=None,
        help="backbone architecture (vit_small, vit_base, tv:resnet50, a timm name ...); by "
        "default read from the run config or the tensor shapes. Pass it only for files whose "
        "architecture cannot be detected.",
    )
    g.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="ViT patch size; detected by default, checked against the file when given",
    )
    g.add_argument(
        "--checkpoint-key",
        default="teacher",
        choices=["teacher", "student"],
        help="network of a full checkpoint to load (default: teacher, the one DINO evaluates; "
        "try student to compare the two)",
    )
    g.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N or auto (CUDA when available)",
    )


def _add_view_flags(p: argparse.ArgumentParser, data_default: str | None = "fashion-mnist") -> None:
    g = p.add_argument_group("input")
    if data_default is not None:
        g.add_argument(
            "--data",
            default=data_default,
            help="a folder with train/ and val/ (or test/) subfolders of class folders, or the "
            f"built-in 'fashion-mnist' (default: {data_default})",
        )
    g.add_argument(
        "--eval-resize",
        type=int,
        default=None,
        metavar="PX",
        help="resize the shorter side to this before the center crop (default: the run's "
        "config, the fashion-mnist preset's, or 256); keep crop/resize = 224/256 for photos",
    )
    g.add_argument(
        "--eval-crop",
        type=int,
        default=None,
        metavar="PX",
        help="center-crop size fed to the backbone (default: the run's config, 28 for "
        "fashion-mnist, or 224); use the size the backbone was trained at",
    )
    g.add_argument(
        "--mean",
        type=float,
        nargs=3,
        default=None,
        help="input normalization mean (RGB); default: the run's config or ImageNet's",
    )
    g.add_argument(
        "--std",
        type=float,
        nargs=3,
        default=None,
        help="input normalization std (RGB); default: the run's config or ImageNet's",
    )


def _add_loader_flags(p: argparse.ArgumentParser, batch_size: int = 128) -> None:
    g = p.add_argument_group("loading")
    g.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"images per forward pass (default: {batch_size}); lower it if memory runs out",
    )
    g.add_argument(
        "--num-workers",
        type=int,
        default=-1,
        help="DataLoader workers decoding images (-1: from the core count; 0: in the main "
        "process, slower but simplest)",
    )


def _load_weights(args: argparse.Namespace) -> Any:
    from dino.eval.views import resolve_device
    from dino.models.weights import load_backbone

    return load_backbone(
        args.weights,
        arch=args.arch,
        patch_size=args.patch_size,
        checkpoint_key=args.checkpoint_key,
        device=resolve_device(args.device),
    )


def _view(args: argparse.Namespace, data: str, backbone: Any) -> Any:
    from dino.eval.api import run_config_of
    from dino.eval.views import resolve_view

    return resolve_view(
        data, run_config_of(backbone), args.eval_resize, args.eval_crop, args.mean, args.std
    )


def _write_json(path: str, obj: Any) -> None:
    import json
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2, default=str))


def _cmd_extract(args: argparse.Namespace, _overrides: dict[str, Any]) -> int:
    from dino.eval.api import extract_features

    backbone = _load_weights(args)
    meta = extract_features(
        backbone,
        args.data,
        args.output,
        _view(args, args.data, backbone),
        split=args.split,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
    )
    print(f"{meta['count']} features of dim {meta['feature_dim']} -> {meta['files']['features']}")
    print(f"index of paths and labels -> {meta['files']['index']}")
    return 0


def _cmd_knn(args: argparse.Namespace, _overrides: dict[str, Any]) -> int:
    from dino.eval.api import knn_eval

    backbone = _load_weights(args)
    res = knn_eval(
        backbone,
        args.data,
        args.k,
        args.temperature,
        _view(args, args.data, backbone),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        subset=args.subset,
    )
    print(
        f"weighted k-NN, T={args.temperature}: {res['n_train']} train / {res['n_val']} val "
        f"images, features of dim {res['feature_dim']}"
    )
    print(f"{'k':>5} {'top-1':>7} {'top-5':>7}")
    for k, v in res["knn"].items():
        print(f"{k:>5} {v['top1']:7.2f} {v['top5']:7.2f}")
    if args.output:
        _write_json(args.output, res)
        print(f"results -> {args.output}")
    return 0


def _cmd_linear(args: argparse.Namespace, _overrides: dict[str, Any]) -> int:
    from pathlib import Path

    from dino.eval.linear import linear_probe

    backbone = _load_weights(args)
    out = args.output_dir
    if out is None:
        w = Path(args.weights)
        out = str(w / "linear") if w.is_dir() else f"linear-{w.stem}"
    res = linear_probe(
        backbone,
        args.data,
        view=_view(args, args.data, backbone),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        n_last_blocks=args.n_last_blocks,
        avgpool=args.avgpool,
        cached=args.cached,
        output_dir=out,
        resume=not args.restart,
        val_every=args.val_every,
        num_workers=args.num_workers,
        device=args.device,
        seed=args.seed,
        subset=args.subset,
    )
    kind = "cached features" if args.cached else "augmented views"
    print(
        f"linear probe ({kind}, {res['n_last_blocks']} last blocks"
        f"{' + avgpool' if res['avgpool'] else ''}, {res['epochs']} epochs): "
        f"top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  "
        f"(best top-1 {res['best_top1']:.2f} at epoch {res['best_epoch']})"
    )
    print(f"results -> {Path(out) / 'results.json'}")
    return 0


def _cmd_attention(args: argparse.Namespace, _overrides: dict[str, Any]) -> int:
    from pathlib import Path

    from dino.data.datasets import IMAGE_EXTENSIONS
    from dino.eval.views import resolve_device
    from dino.viz.attention import save_attention_maps

    backbone = _load_weights(args)
    files: list[Path] = []
    for item in args.images:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise DinoError(f"image {p} does not exist; pass image files or folders of images")
    if not files:
        raise DinoError(f"no image files in {' '.join(args.images)}")
    size = args.image_size
    if size is None:
        info = backbone.weights_info
        run_crop = ((info.run_config or {}).get("data") or {}).get("global_size")
        size = int(run_crop) if run_crop and int(run_crop) < 224 else 480
    device = resolve_device(args.device)
    used: set[str] = set()
    for f in files:
        name = f.stem
        while name in used:
            name += "_"
        used.add(name)
        res = save_attention_maps(
            backbone,
            f,
            Path(args.output) / name,
            image_size=size or None,
            threshold=args.threshold,
            mean=args.mean,
            std=args.std,
            device=device,
        )
        h, w = res["patch_grid"]
        print(
            f"{f}: {res['attention'].shape[0]} heads on a {h}x{w} patch grid -> {res['overview']}"
        )
    return 0


def _cmd_export(args: argparse.Namespace, _overrides: dict[str, Any]) -> int:
    from dino.models.export import export_backbone

    res = export_backbone(
        args.weights,
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


def _cmd_report(args: argparse.Namespace, _overrides: dict[str, Any]) -> int:
    from dino.eval.views import resolve_device
    from dino.viz.report import write_report

    res = write_report(
        args.run_dir,
        args.output,
        images=args.images,
        image_size=args.image_size,
        device=str(resolve_device(args.device)),
    )
    print(
        f"report -> {res['html']} ({len(res['plots'])} plots, {len(res['attention'])} "
        "attention overviews)"
    )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], int]] = {
    "train": _cmd_train,
    "config": _cmd_config,
    "check-data": _cmd_check_data,
    "extract": _cmd_extract,
    "knn": _cmd_knn,
    "linear": _cmd_linear,
    "attention": _cmd_attention,
    "export": _cmd_export,
    "report": _cmd_report,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino",
        description="DINO self-supervised pretraining of vision backbones, and their evaluation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="pretrain a backbone with DINO",
        description="Pretrain with DINO. With no arguments: the built-in Fashion-MNIST CPU run. "
        "With --data FOLDER and no --config: the reference recipe (ViT-S/16, 2x224 + 8x96 crops).",
    )
    t.add_argument("--config", help=f"a YAML file or preset name ({', '.join(list_presets())})")
    t.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in this folder from its latest checkpoint (or from one of its "
        "checkpoint files), with its config.yaml; flags given here override it",
    )
    t.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train on N processes of this machine (one per GPU, or CPU processes sharing the "
        "cores): starts torchrun, which runs this same command on each; --batch-size is per "
        "process. For several machines run torchrun yourself (docs/scaling.md)",
    )
    _add_config_flags(t)
    c = sub.add_parser("config", help="list presets or show one")
    c.add_argument("action", choices=["list", "show"])
    c.add_argument("name", nargs="?")
    cd = sub.add_parser(
        "check-data",
        help="find the images of a folder that training could not decode",
        description="Decode every image file below PATH as training does, in parallel, and "
        "list the unreadable ones (truncated, empty, not an image, absurd dimensions) with the "
        "reason, then a summary. Exit code 0 when all are readable, 1 otherwise. Training "
        "replaces unreadable images and stops past --max-bad-fraction; remove or fix them first.",
    )
    cd.add_argument("path", help="a folder of images (searched recursively) or one image file")
    cd.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes decoding images (default 0: one per core)",
    )
    cd.add_argument(
        "--output",
        metavar="FILE",
        default=None,
        help="also write the unreadable paths here, one a line (as bad_files.txt of a run)",
    )
    _add_eval_parsers(sub)
    _add_output_parsers(sub)
    return parser


def _add_eval_parsers(sub: Any) -> None:
    e = sub.add_parser(
        "extract",
        help="save the features of every image of a folder",
        description="Features of a frozen backbone for every image of a folder (recursively; the "
        "first-level subfolder is the class) or of a split of the built-in data set, written as "
        "features.npy with index.csv (paths, labels) and meta.json.",
    )
    _add_weights_flags(e)
    _add_view_flags(e, data_default=None)
    e.add_argument(
        "--data",
        required=True,
        help="a folder of images (class subfolders give labels) or 'fashion-mnist'",
    )
    e.add_argument(
        "--split",
        default="train",
        choices=["train", "test"],
        help="split of the built-in data set to extract (folders: ignored)",
    )
    e.add_argument(
        "--output",
        default="features",
        metavar="DIR",
        help="folder for features.npy, index.csv and meta.json (default: features)",
    )
    _add_loader_flags(e)

    k = sub.add_parser(
        "knn",
        help="weighted k-NN accuracy of frozen features",
        description="Weighted k-NN classification: each of the k nearest training "
        "features (cosine) votes for its class with weight exp(sim / T).",
    )
    _add_weights_flags(k)
    _add_view_flags(k)
    k.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[10, 20, 100, 200],
        help="numbers of neighbours to report (default: 10 20 100 200; 20 is the "
        "paper's headline number)",
    )
    k.add_argument(
        "--temperature",
        type=float,
        default=0.07,
        help="T of the vote weights exp(sim / T) (default 0.07); higher flattens votes",
    )
    k.add_argument(
        "--subset",
        type=int,
        default=0,
        help="use only the first N images of each split, for quick trials (0: all)",
    )
    k.add_argument("--output", default=None, metavar="JSON", help="also write the results here")
    _add_loader_flags(k)

    lin = sub.add_parser(
        "linear",
        help="linear-probe accuracy of frozen features",
        description="Train a linear classifier on frozen features: SGD momentum 0.9, "
        "lr 0.001 x batch / 256, cosine, no weight decay; RandomResizedCrop + flip for training, "
        "Resize + CenterCrop for evaluation. Resumes from the output folder's checkpoint.",
    )
    _add_weights_flags(lin)
    _add_view_flags(lin)
    lin.add_argument(
        "--epochs",
        type=int,
        default=100,
        help="training epochs (100 in the paper; fewer for a quick estimate)",
    )
    lin.add_argument(
        "--lr",
        type=float,
        default=0.001,
        help="learning rate for a batch of 256, scaled with --batch-size (default "
        "0.001); sweep it (x10, /10) when accuracy matters",
    )
    lin.add_argument(
        "--n-last-blocks",
        type=int,
        default=None,
        help="concatenate the [CLS] tokens of this many last blocks (default: 4, "
        "or 1 for ViT-B and wider as in the paper)",
    )
    lin.add_argument(
        "--avgpool",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also concatenate the average-pooled patch tokens of the last block "
        "(default: on for ViT-B and wider only)",
    )
    lin.add_argument(
        "--cached",
        action="store_true",
        help="extract features once without augmentation and train on them: "
        "minutes instead of hours, slightly lower accuracy",
    )
    lin.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help="checkpoint.pth and results.json go here (default: <run>/linear for a "
        "run folder, else ./linear-<weights name>)",
    )
    lin.add_argument(
        "--restart",
        action="store_true",
        help="ignore a checkpoint in the output folder and start over",
    )
    lin.add_argument(
        "--val-every",
        type=int,
        default=1,
        help="evaluate every N epochs (default 1); raise it when evaluation is slow",
    )
    lin.add_argument("--seed", type=int, default=0, help="seed of initialization and data order")
    lin.add_argument(
        "--subset",
        type=int,
        default=0,
        help="use only the first N images of each split, for quick trials (0: all)",
    )
    _add_loader_flags(lin, batch_size=256)

    a = sub.add_parser(
        "attention",
        help="self-attention maps of a ViT on images",
        description="Last-block attention of [CLS] to every patch, one map per head, and masks "
        "keeping the patches that hold --threshold of each head's attention; writes per-head "
        "PNGs and overview.png per image.",
    )
    a.add_argument("images", nargs="+", help="image files or folders of images (any format)")
    _add_weights_flags(a)
    a.add_argument(
        "--output",
        default="attention",
        metavar="DIR",
        help="one subfolder per image is written here (default: attention)",
    )
    a.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="PX",
        help="resize the shorter side to this first, 0 keeps the size (default: 480, "
        "or the run's crop size when it trained on crops under 224); larger shows "
        "finer maps at a quadratic cost",
    )
    a.add_argument(
        "--threshold",
        type=float,
        default=0.6,
        help="attention mass the masks keep (default 0.6, the paper's)",
    )
    a.add_argument(
        "--mean",
        type=float,
        nargs=3,
        default=None,
        help="input normalization mean (RGB); default: the run's config or ImageNet's",
    )
    a.add_argument(
        "--std",
        type=float,
        nargs=3,
        default=None,
        help="input normalization std (RGB); default: the run's config or ImageNet's",
    )


def _add_output_parsers(sub: Any) -> None:
    x = sub.add_parser(
        "export",
        help="write a backbone as safetensors + config.json for timm, and ONNX",
        description="Export a backbone (a run's teacher by default): model.safetensors and a "
        "timm config.json, so that timm.create_model('local-dir:DIR', pretrained=True, "
        "num_classes=0) loads it, and model.onnx (dynamic batch, fixed image size). Both are "
        "loaded back and compared with the backbone (onnxruntime when installed).",
    )
    _add_weights_flags(x, positional=True)
    x.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder for model.safetensors, config.json and model.onnx (created if needed)",
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
        help="also write model.onnx (default: yes; needs `pip install onnx`)",
    )
    x.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    x.add_argument(
        "--no-check",
        action="store_true",
        help="skip loading the export back with timm and onnxruntime to compare the features",
    )

    r = sub.add_parser(
        "report",
        help="an HTML report of a run: curves and attention maps",
        description="Write RUN_DIR/report/report.html with PNG plots of metrics.jsonl (loss and "
        "k-NN over epochs; learning rate, weight decay, teacher momentum and temperature, teacher "
        "entropy and KL over iterations) and the final teacher's attention on a few images of "
        "the run's data. Needs matplotlib (pip install 'dino[report]').",
    )
    r.add_argument("run_dir", metavar="RUN_DIR", help="a folder that `dino train` wrote")
    r.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="where to write report.html and the PNGs (default: RUN_DIR/report)",
    )
    r.add_argument(
        "--images",
        type=int,
        default=4,
        help="number of images whose attention is drawn (default 4; 0: none)",
    )
    r.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="PX",
        help="resize those images' shorter side to this (default: the run's crop size when "
        "under 224, else 480)",
    )
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    leaves = leaf_fields()
    overrides = {k: v for k, v in vars(args).items() if k in leaves}
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return COMMANDS[args.command](args, overrides)
    except DinoError as exc:
        print(f"dino: error: {f'rank {rank}: ' if world > 1 else ''}{exc}", file=sys.stderr)
        if world > 1:  # one process of a torchrun run: torchrun's report shows the message
            from dino.training.distributed import record_failure

            record_failure(exc)
        return 2
    except KeyboardInterrupt:
        print("dino: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if world > 1:
            from dino.training.distributed import worker_failed

            worker_failed(exc)
        raise


if __name__ == "__main__":
    sys.exit(main())
