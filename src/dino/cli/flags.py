"""Flag groups and helpers shared by the ``dino`` commands; each flag is defined here once."""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from dino.config import leaf_fields
from dino.devices import DEVICE_CHOICES
from dino.errors import DinoError
from dino.value_checks import check_value


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage mistakes (an unknown flag, ``--k abc``, a missing
    argument) end like every other error: one line ``dino: error: ...`` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"dino: error: {message}; see `{self.prog} --help`\n")


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
        elif typ is bool:  # --flag alone means true; --flag false turns a preset's off
            kwargs |= {"nargs": "?", "const": True, "metavar": "BOOL"}
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
        help="cpu, cuda, cuda:N, mps (Apple GPUs) or auto (CUDA when available)",
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


def add_images_flags(p: argparse.ArgumentParser, split: str, outputs: str) -> None:
    """``--data`` (a folder of images or a built-in data set), its ``--split`` (default
    ``split``) and the required ``--output`` folder (for ``outputs``)."""
    g = p.add_argument_group("images")
    g.add_argument(
        "--data",
        required=True,
        help="a folder of images (searched recursively; first-level subfolders are the classes, "
        "when every image sits in one) or 'fashion-mnist'",
    )
    g.add_argument(
        "--split",
        default=split,
        choices=["train", "test"],
        help=f"split of the built-in data set (default: {split}; folders: ignored)",
    )
    g.add_argument(
        "--output", required=True, metavar="DIR", help=f"folder for {outputs} (created if needed)"
    )


def add_loader_flags(p: argparse.ArgumentParser, batch_size: int = 128) -> None:
    """The "loading" group: ``--batch-size`` (default ``batch_size``) and ``--num-workers``."""
    g = p.add_argument_group("loading")
    g.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"images per forward pass (default: {batch_size}); lower it if memory runs out",
    )
    add_num_workers_flag(g, ", slower but simplest")


def add_num_workers_flag(g: argparse._ActionsContainer, main_process_note: str = "") -> None:
    """``--num-workers``; ``main_process_note`` ends the help's words on 0 workers."""
    g.add_argument(
        "--num-workers",
        type=int,
        default=-1,
        help="DataLoader workers decoding images (-1: from the core count; 0: in the main "
        f"process{main_process_note})",
    )


def add_json_flag(g: argparse._ActionsContainer) -> None:
    """``--json OUT``: the file the scores are also written to, which must not exist yet."""
    g.add_argument(
        "--json", default=None, metavar="OUT", help="also write the scores here (must not exist)"
    )


def print_outputs(outputs: dict[str, str | None]) -> None:
    """A line ``<what> -> <path>`` for each output file of ``outputs`` that was asked for."""
    for what, path in outputs.items():
        if path:
            print(f"{what} -> {path}")


def add_threshold_flag(g: argparse._ActionsContainer) -> None:
    """``--threshold``: the share of each head's attention mass that its mask keeps."""
    g.add_argument(
        "--threshold",
        type=float,
        default=0.6,
        help="attention mass the masks keep (default 0.6, the paper's)",
    )


def output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct output folder name for each of ``paths``: the file's stem, with ``_``
    appended while an earlier path took it."""
    used: set[str] = set()
    names = []
    for path in paths:
        name = path.stem
        while name in used:
            name += "_"
        used.add(name)
        names.append(name)
    return names


def load_weights(args: argparse.Namespace) -> Any:
    """The frozen backbone the weights flags name."""
    from dino.devices import resolve_device
    from dino.models.weight_files import RANDOM
    from dino.models.weights import load_backbone

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


#: The valid values of the commands' flags by argparse ``dest`` (the arguments of
#: :func:`dino.value_checks.check_value`), checked by :func:`check_flags` before a command loads
#: anything; ``COMMAND_FLAG_VALUES`` holds a command's exceptions. The config fields of
#: ``dino train`` are checked by :func:`dino.config_checks.validate` instead.
IMAGE_SIDES = "[1, 8192]"
FLAG_VALUES: dict[str, dict[str, Any]] = {
    "patch_size": {"range": "[1, inf)"},
    "eval_resize": {"range": IMAGE_SIDES},
    "eval_crop": {"range": IMAGE_SIDES},
    "image_size": {"range": IMAGE_SIDES},
    "mean": {"range": "[0, 1]", "length": 3},
    "std": {"range": "(0, inf)", "length": 3},
    "batch_size": {"range": "[1, inf)"},
    "num_workers": {"range": "[-1, inf)"},
    "workers": {"range": "[0, inf)"},
    "subset": {"range": "[0, inf)"},
    "k": {"range": "[1, inf)", "length": (1, float("inf"))},
    "temperature": {"range": "(0, inf)"},
    "epochs": {"range": "[1, inf)"},
    "lr": {"range": "(0, inf)"},
    "n_last_blocks": {"range": "[1, inf)"},
    "val_every": {"range": "[1, inf)"},
    "seed": {"range": "[0, 4294967295]"},
    "threshold": {"range": "(0, 1]"},
    "images": {"range": "[0, inf)"},
    "nproc": {"range": "[1, inf)"},
    "time_budget": {"range": "[0, inf)"},
    "layer_decay": {"range": "(0, 1]"},
    "weight_decay": {"range": "[0, inf)"},
    "drop_path": {"range": "[0, 1)"},
    "label_smoothing": {"range": "[0, 1)"},
    "warmup": {"range": "[0, 1)"},
    "randaugment": {"range": "[0, 30]"},
    "labels_per_class": {"range": "[0, inf)"},
    "label_seed": {"range": "[0, 4294967295]"},
    "device": {"choices": DEVICE_CHOICES},
}
COMMAND_FLAG_VALUES: dict[str, dict[str, dict[str, Any]]] = {
    "attention": {"image_size": {"range": "[0, 8192]"}},  # 0 keeps the image's size
    "classify": {"k": {"range": "[1, inf)"}},  # one k: the vote's
    "cluster": {"k": {"range": "[1, inf)"}},  # one number of clusters
}
#: Output flags that name a file; every other ``output`` / ``output_dir`` names a folder.
FILE_OUTPUTS = {("knn", "output"), ("check-data", "output"), ("classify", "output")}


def check_flags(args: argparse.Namespace) -> None:
    """Check every flag of the command against its valid values, and its output path, before
    the command loads data or weights; raise :class:`DinoError` naming the first bad one."""
    command = getattr(args, "command", "")
    config = leaf_fields() if command == "train" else {}
    if command == "train" and args.resume and args.config:
        raise DinoError(
            "--config does not apply with --resume (the run continues with its config.yaml); "
            "drop --config"
        )
    specs = {**FLAG_VALUES, **COMMAND_FLAG_VALUES.get(command, {})}
    for dest, value in vars(args).items():
        if dest in config or dest not in specs or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if all(isinstance(v, str) for v in values) and "choices" not in specs[dest]:
            continue  # a flag of this name that takes paths (attention's images)
        check_value(f"--{dest.replace('_', '-')}", value, **specs[dest])
    for dest in ("output", "output_dir"):
        path = getattr(args, dest, None)
        if isinstance(path, str) and path:
            kind = "file" if (command, dest) in FILE_OUTPUTS else "folder"
            check_output(path, f"--{dest.replace('_', '-')}", kind)


def check_output(path: str | Path, flag: str, kind: str = "folder") -> None:
    """Raise :class:`DinoError` unless ``path`` can be written as a ``kind`` (``"folder"`` or
    ``"file"``): a folder must not be an existing file, a file not an existing folder, and the
    nearest existing folder above it must be writable. Creates nothing."""
    p = Path(path)
    if kind == "folder" and p.exists() and not p.is_dir():
        raise DinoError(f"{flag} {p} is an existing file, not a folder; choose a folder path")
    if kind == "file" and p.is_dir():
        raise DinoError(f"{flag} {p} is a folder; give the path of a file in it")
    above = p.absolute().parent if kind == "file" else p.absolute()  # a file may exist
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise DinoError(f"{flag} {p} cannot be created: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK) or (p.is_file() and not os.access(p, os.W_OK)):
        raise DinoError(f"{flag} {p} cannot be written: no write permission on {above}")
