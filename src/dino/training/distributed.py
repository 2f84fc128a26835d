"""Training on several processes: the ``--nproc`` launcher, collectives, failure reports.

A run on ``W`` processes is started by PyTorch's own launcher, torchrun
(``torch.distributed.run``), either directly or through ``dino train --nproc N``
(:func:`launch`). Every process joins the process group (:func:`setup_distributed`): NCCL on
GPUs, gloo on CPUs.

When one process dies, torchrun notices within its monitor interval (0.1 s), stops the others
and prints a report whose root cause names the rank that failed and why (signal, exception with
its traceback). The others see their collectives fail first (the peer's sockets close);
:func:`worker_failed` makes them wait a few seconds for torchrun to stop them, so that the report
blames the process that failed and not one that merely lost contact with it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dino.devices import launch_env
from dino.errors import DinoError

TIMEOUT_ENV = "DINO_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
PEER_FAILURE_WAIT_S = 5.0


# ---------------------------------------------------------------- the process group


@dataclass
class Dist:
    """The process group of this run (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group if :func:`setup_distributed` created it (end of a run)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device: str) -> Dist:
    """Join the process group that torchrun describes in the environment, if any.

    NCCL when the run uses GPUs (process ``LOCAL_RANK`` of a node takes GPU ``LOCAL_RANK``),
    gloo on CPUs. Collectives fail after ``DINO_DIST_TIMEOUT`` seconds (default 600) instead of
    torch's 30 minutes when a process hangs. Processes other than rank 0 log errors only.
    """
    env = launch_env()
    if env.world <= 1:
        return Dist()
    rank, local_rank = env.rank, env.local_rank
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DinoError(
                f"process rank {rank} is local process {local_rank} of its machine but only "
                f"{torch.cuda.device_count()} GPU(s) are visible; start at most that many "
                "processes per machine (--nproc / --nproc-per-node) or use --device cpu"
            )
        torch.cuda.set_device(local_rank)
    if rank != 0:
        logging.getLogger("dino").setLevel(logging.ERROR)
    owns = False
    if not dist.is_initialized():
        extra = {"device_id": torch.device("cuda", local_rank)} if use_cuda else {}
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=collective_timeout(), **extra
        )
        owns = True
    return Dist(rank, env.world, local_rank, owns)


def collective_timeout() -> timedelta:
    """How long a collective may wait for the other processes (``DINO_DIST_TIMEOUT`` seconds,
    default 600) before it fails. A dead process is noticed at once; this only bounds a hung one,
    so it must exceed the longest rank-0-only pause (writing a checkpoint)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DinoError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise DinoError(f"{TIMEOUT_ENV} must be positive, got {raw}")
    return timedelta(seconds=seconds)


# ---------------------------------------------------------------- the --nproc launcher


def split_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N`` flag (or an abbreviation argparse
    accepted for it): what each process launched by :func:`launch` runs."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0]
        if len(name) > 3 and "--nproc".startswith(name):
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


def launch(nproc: int, worker_argv: list[str], run_dir: str | None) -> int:
    """Run ``dino <worker_argv>`` on ``nproc`` local processes through torchrun (standalone
    rendezvous on a free port). Returns 0, or prints torchrun's failure report, one line naming
    the failed rank and the way to resume, and returns 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if launch_env().world > 1:
        raise DinoError("--nproc starts torchrun itself; drop it when running under torchrun")
    # torchrun would set 1 thread per process; share the cores instead (CPU runs need them)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "dino", *worker_argv]
    )
    try:
        run(args)
    except SignalException as exc:  # Ctrl-C / SIGTERM: torchrun passed it on, the ranks saved
        resume = f"; continue with `dino train --resume {run_dir} --nproc {nproc}`"
        print(
            f"dino: stopped by signal {int(exc.sigval)}"
            f"{resume if run_dir and (Path(run_dir) / 'checkpoint.pth').exists() else ''}",
            file=sys.stderr,
        )
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(exc.format_msg(), file=sys.stderr)
        cause = failure.message
        if isinstance(cause, dict):
            cause = cause.get("message", "see the report above")
        where = ""
        if run_dir and (Path(run_dir) / "checkpoint.pth").exists():
            where = (
                f"; the last checkpoint is intact: continue with "
                f"`dino train --resume {run_dir} --nproc {nproc}`"
            )
        print(
            f"dino: error: process rank {rank} failed ({str(cause).strip()}) and the other "
            f"processes were stopped{where}",
            file=sys.stderr,
        )
        return 1
    return 0


# ---------------------------------------------------------------- failures


def is_comm_error(exc: BaseException) -> bool:
    """True for errors of a collective whose peer is gone (closed socket, NCCL abort, timeout)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "nccl", "connection reset", "connection closed")
    )


def record_failure(exc: BaseException) -> None:
    """Write ``exc`` (message and traceback) to torchrun's error file for its report, if any."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(exc)


def worker_failed(exc: BaseException) -> None:
    """Report an exception that ends a training process of a multi-process run.

    A process that lost contact with the others (its collective failed) says so and waits up to
    5 s for torchrun to stop it (torchrun then reports the process that failed first as the root
    cause), then exits with code 1. Any other exception goes to torchrun's error file and the
    caller re-raises it."""
    env = launch_env()
    rank = env.rank
    if env.world <= 1:
        return
    if not is_comm_error(exc):
        record_failure(exc)
        return
    # gloo's messages start with a source location and go on with advice: keep the cause
    first = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip()).split(". ")[0].splitlines()
    cause = first[0] if first and first[0] else type(exc).__name__
    print(
        f"dino: rank {rank} lost contact with the other processes ({cause}); another process "
        "probably failed first: see the launcher's report",
        file=sys.stderr,
        flush=True,
    )
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)  # torchrun's stop ends this process at once
        time.sleep(PEER_FAILURE_WAIT_S)
    record_failure(exc)
    sys.stderr.flush()
    os._exit(1)  # skip interpreter teardown: it may block on the broken process group


# ---------------------------------------------------------------- collectives


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over all processes (a new tensor; ``x`` is unchanged)."""
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every process's ``value`` (one small all-reduce)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _backend_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_strided(x: torch.Tensor, n: int) -> torch.Tensor | None:
    """Rows ``r, r + W, r + 2W, ...`` of an ``n``-row tensor are ``x`` on rank ``r``: returns
    the whole tensor, in its original row order, on rank 0 (CPU) and None elsewhere."""
    world, rank = dist.get_world_size(), dist.get_rank()
    counts = [len(range(r, n, world)) for r in range(world)]
    if x.shape[0] != counts[rank]:
        raise ValueError(f"rank {rank} holds {x.shape[0]} rows, expected {counts[rank]}")
    device = _backend_device()
    buf = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=device)
    buf[: x.shape[0]] = x
    parts = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
    dist.gather(buf, parts, dst=0)
    if parts is None:
        return None
    out = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=device)
    for r, part in enumerate(parts):
        out[r::world] = part[: counts[r]]
    return out.cpu()


@torch.no_grad()
def replica_spread(module: nn.Module) -> float:
    """Largest difference between processes of any parameter's sum: 0 when every process holds
    the same weights, as DDP and an identical EMA on every rank guarantee."""
    params = [p for p in module.parameters()]
    if not params:
        return 0.0
    sums = torch.stack([p.detach().double().sum() for p in params])
    hi, lo = sums.clone(), sums.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())


# ---------------------------------------------------------------- synchronized BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` that gradients flow through: the gradient of the sum with respect to
    each process's term is the sum of the gradients of all processes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over all processes, differentiable."""
    return _SumOverRanks.apply(x)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over the global batch (all processes) on CPU process groups
    (gloo), where ``torch.nn.SyncBatchNorm`` does not run (GPU kernels; DDP refuses it on CPU).

    The statistics are summed by a differentiable all-reduce: two passes, the mean then the
    biased variance, as one process computes them on the concatenated batch; the running
    variance is the unbiased one, as in ``nn.BatchNorm*``. Outside training, or in a single
    process, it is a plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        stats = sum_over_ranks(torch.cat([x.sum(dims), count]))
        n = stats[-1]
        mean = stats[:-1] / n
        centered = x - mean.view(shape)
        var = sum_over_ranks((centered * centered).sum(dims)) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), factor)
                n_ = n.detach()
                self.running_var.lerp_(var.detach() * n_ / (n_ - 1).clamp_min(1), factor)
        return y.to(input.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm synchronized over the process group: torch's
    ``SyncBatchNorm`` on GPUs, :class:`GlobalBatchNorm` on CPUs. Weights and running statistics
    are kept."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            m.__class__ = GlobalBatchNorm  # same state; a forward that syncs on CPU
    return model
