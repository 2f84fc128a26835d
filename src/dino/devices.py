"""Where a command runs: its place among the processes torchrun started, its device, and the
numeric precision it computes in."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dino.errors import DinoError

#: The values of ``--device`` (``cuda:N`` stands for any ``cuda:<number>``). ``auto`` is CUDA
#: when available, else the CPU; Apple GPUs (``mps``) are used when asked for by name.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells each process it starts (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``); rank 0 of 1 outside torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1


def launch_env() -> LaunchEnv:
    """This process's :class:`LaunchEnv`, read from the environment torchrun sets."""
    env = os.environ
    try:
        return LaunchEnv(
            int(env.get("RANK", "0")),
            int(env.get("WORLD_SIZE", "1")),
            int(env.get("LOCAL_RANK", "0")),
            int(env.get("LOCAL_WORLD_SIZE", "1")),
        )
    except ValueError:
        raise DinoError(
            "RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be whole numbers (torchrun "
            "sets them); unset them to run a single process"
        ) from None


def resolve_device(name: str, world: int = 1, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU. With several processes (``world > 1``)
    ``cuda`` is GPU ``local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world > 1:
        name = f"cuda:{local_rank}"
    elif name.startswith("cuda:") and world > 1:
        raise DinoError(
            f"--device {name} would put every process on one GPU; with several processes use "
            "--device cuda (process LOCAL_RANK takes GPU LOCAL_RANK) and choose the GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DinoError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "mps" and not mps_available():
        raise DinoError(
            "--device mps was asked for but no Apple GPU (MPS) is available; use --device cpu"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise DinoError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None


def mps_available() -> bool:
    """Whether this PyTorch build has the Apple GPU backend (MPS) and the machine has one."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CPUs and GPUs that support it, else fp16 on CUDA, else fp32."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DinoError("this GPU has no bf16 support; use --precision fp16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return "bf16"
        except (AttributeError, RuntimeError):
            pass
    return "fp32"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
