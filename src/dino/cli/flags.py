"""Flag groups and helpers shared by the ``dino`` commands; each flag is defined here once."""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path
from typing import Any

from dino.config import leaf_fields
from dino.errors import DinoError


def add_config_flags(p: argparse.ArgumentParser) -> None:
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


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, by field name."""
    leaves = leaf_fields()
    return {k: v for k, v in vars(args).items() if k in leaves}


def add_weights_flags(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """``--weights`` (or a positional WEIGHTS) and how to build and place the network."""
    g = p.add_argument_group("weights")
    g.add_argument(
        *(["weights"] if positional else ["--weights"]),
        **({} if positional else {"required": True}),
        metavar="RUN|FILE|NAME",
        help="a `dino train` run folder, a checkpoint or state-dict file (ours or the reference "
        "code's), a reference model name: dino_vits16, dino_vits8, dino_vitb16, dino_vitb8, "
        "dino_resnet50 (downloaded once into the torch hub cache), or 'random': the untrained "
        "network of --arch/--patch-size or of --like RUN, the baseline of every comparison",
    )
    g.add_argument(
        "--arch",
        default=None,
        help="backbone architecture (vit_small, vit_base, tv:resnet50, a timm name ...); by "
        "default read from the run config or the tensor shapes. Pass it only for files whose "
        "architecture cannot be detected, or with --weights random.",
    )
    g.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="ViT patch size; detected by default, checked against the file when given",
    )
    g.add_argument(
        "--like",
        metavar="RUN",
        default=None,
        help="with --weights random: take the architecture, crop sizes and normalization of "
        "this `dino train` run folder",
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


def add_norm_flags(g: argparse._ActionsContainer) -> None:
    """``--mean`` / ``--std`` of the input normalization."""
    for name in ("mean", "std"):
        g.add_argument(
            f"--{name}",
            type=float,
            nargs=3,
            default=None,
            help=f"input normalization {name} (RGB); default: the run's config or ImageNet's",
        )


def add_view_flags(p: argparse.ArgumentParser, data_default: str | None = "fashion-mnist") -> None:
    """``--data`` (when it has a default) and the evaluation view: resize, crop, mean, std."""
    g = p.add_argument_group("input")
    if data_default is not None:
        g.add_argument(
            "--data",
            default=data_default,
            help="a folder with train/ and val/ (or test/) subfolders of class folders, or a "
            f"built-in data set such as 'fashion-mnist' (default: {data_default})",
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
    add_norm_flags(g)


def add_loader_flags(p: argparse.ArgumentParser, batch_size: int = 128) -> None:
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


def load_weights(args: argparse.Namespace) -> Any:
    """The frozen backbone the weights flags name."""
    from dino.eval.views import resolve_device
    from dino.models.weights import RANDOM, load_backbone

    if args.like and args.weights != RANDOM:
        raise DinoError("--like only applies to --weights random; drop it")
    return load_backbone(
        args.weights,
        arch=args.arch,
        patch_size=args.patch_size,
        checkpoint_key=args.checkpoint_key,
        device=resolve_device(args.device),
        like=args.like,
    )


def eval_view(args: argparse.Namespace, data: str, backbone: Any) -> Any:
    """The evaluation view of ``data`` for ``backbone``, with the view flags applied."""
    from dino.eval.api import run_config_of
    from dino.eval.views import resolve_view

    return resolve_view(
        data, run_config_of(backbone), args.eval_resize, args.eval_crop, args.mean, args.std
    )


def write_json(path: str | Path, obj: Any) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2, default=str))
