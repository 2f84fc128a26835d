"""Running ``dino`` commands in a test: the exit code and output of one call, the one error line
a refused call must print, and the tiny untrained ViT the commands are run with."""

from __future__ import annotations

from typing import Any

import pytest

from dino.cli import main

#: The weights flags of an untrained tiny ViT: quick to build, enough to run every command.
RANDOM_PICO = ["--weights", "random", "--arch", "vit_pico", "--patch-size", "8"]


def pico() -> Any:
    """The network of :data:`RANDOM_PICO`, loaded as the library loads weights."""
    import dino

    return dino.load_backbone("random", arch="vit_pico", patch_size=8)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``dino ARGV``: (exit code, stdout, stderr)."""
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    """The single ``dino: error: ...`` line of ``err``, which must hold nothing else."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dino: error: "), err
    assert "Traceback" not in err
    return lines[0]
