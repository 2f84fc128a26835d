"""``dino train``, ``dino config`` and ``dino check-data``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dino.cli.flags import add_config_flags, config_overrides
from dino.config_checks import run_folder
from dino.config_load import PRESET_DIR, default_preset, list_presets, load_config, load_yaml
from dino.errors import DinoError


def register(sub: Any) -> None:
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
    add_config_flags(t)
    t.set_defaults(run=train)

    c = sub.add_parser("config", help="list presets or show one")
    c.add_argument("action", choices=["list", "show"])
    c.add_argument("name", nargs="?")
    c.set_defaults(run=config)

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
    cd.set_defaults(run=check_data)


def train(args: argparse.Namespace) -> int:
    from dino.training import train as run_training

    overrides = config_overrides(args)
    if args.resume:
        run_dir = run_folder(args.resume)
        cfg = load_config(str(run_dir / "config.yaml"), overrides)
    else:
        preset = args.config or default_preset(overrides.get("data", "fashion-mnist"))
        cfg = load_config(preset, overrides)
    if args.nproc is not None and args.nproc != 1:
        if args.nproc < 1:
            raise DinoError(f"--nproc must be at least 1, got {args.nproc}")
        from dino.training.distributed import launch, split_nproc
        from dino.training.run_state import default_run_dir, open_run_dir

        worker_argv = split_nproc(args.argv)
        if not args.resume and not cfg.run.output_dir:  # chosen here, for every process
            cfg.run.output_dir = default_run_dir()
            worker_argv += ["--output-dir", cfg.run.output_dir]
        # refuse a bad folder or resume here, once, rather than in every process
        launch_dir = str(open_run_dir(cfg, args.resume, args.nproc, main=False)[0])
        return launch(args.nproc, worker_argv, launch_dir)
    results = run_training(cfg, resume=args.resume)
    knn = results.get("knn") if results else None
    if knn:
        print("\nweighted k-NN (teacher [CLS] features)")
        print(f"{'k':>5} {'top-1':>7} {'top-5':>7}")
        for k, v in knn.items():
            print(f"{k:>5} {v['top1']:7.2f} {v['top5']:7.2f}")
    return 0


def config(args: argparse.Namespace) -> int:
    if args.action == "list" or not args.name:
        print("\n".join(list_presets()))
        return 0
    import yaml

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


def check_data(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dino.data.check import check_folder

    with tqdm(desc="checking images", unit=" files", disable=not sys.stderr.isatty()) as bar:
        report = check_folder(args.path, args.workers, bar.update)
    for path, reason in report.bad:
        print(f"unreadable: {path}: {reason}")
    print(report.summary())
    if args.output:
        from dino.atomic_files import write_text

        write_text(args.output, "".join(f"{path}\n" for path, _ in report.bad))
        print(f"list of unreadable files -> {args.output}")
    return 0 if report.ok else 1
