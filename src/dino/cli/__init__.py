"""The ``dino`` command line. ``dino <command> --help`` documents every flag.

One module per group of commands; each has ``register(sub)``, which adds its subcommands and
sets ``run`` (``args -> exit code``) on them. Errors a user can fix end in one line
``dino: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dino.cli import (
    check_run,
    classify,
    cluster,
    copy_detection,
    duplicates,
    evaluate,
    export,
    finetune,
    make_scenes,
    retrieval,
    segment,
    track,
    train,
    visualize,
)
from dino.cli.flags import OneLineParser, check_flags
from dino.errors import DinoError

#: The command modules, in the order ``dino --help`` lists their commands.
COMMAND_MODULES = [
    train,
    check_run,
    evaluate,
    classify,
    finetune,
    cluster,
    duplicates,
    track,
    retrieval,
    copy_detection,
    visualize,
    segment,
    make_scenes,
    export,
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dino",
        description="DINO self-supervised pretraining of vision backbones, and their evaluation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dino.devices import launch_env

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    rank, world = launch_env().rank, launch_env().world
    try:
        check_flags(args)
        return args.run(args)
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
        message = one_line_failure(exc)
        if message is not None:  # out of memory, or a file that could not be written
            print(f"dino: error: {f'rank {rank}: ' if world > 1 else ''}{message}", file=sys.stderr)
            if world > 1:
                from dino.training.distributed import record_failure

                record_failure(exc)
            return 2
        if world > 1:
            from dino.training.distributed import worker_failed

            worker_failed(exc)
        raise


def one_line_failure(exc: BaseException) -> str | None:
    """The one line for a failure the user can act on that reached the command line unhandled:
    memory exhausted, or a file that could not be written (no space, permission, read-only);
    None for a bug (then the traceback is shown)."""
    from dino.atomic_files import WRITE_ERRNOS, write_failure
    from dino.training.memory import out_of_memory_message

    message = out_of_memory_message(exc)
    if message is None and isinstance(exc, OSError) and exc.filename and exc.errno in WRITE_ERRNOS:
        message = str(write_failure(exc.filename, exc))
    return message


if __name__ == "__main__":
    sys.exit(main())
