"""What only a CUDA GPU can check: device selection, mixed precision with the gradient scaler,
the batched augmentation on the GPU, NCCL collectives under DDP, and training with the memory
flags. Marked ``cuda`` and skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_augment import images, make_aug

from dino.cli import main
from dino.devices import resolve_device, resolve_precision

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TINY_GPU = (
    "--subset 256 --arch vit_pico --depth 2 --patch-size 7 --global-size 28 --local-size 14 "
    "--local-crops 2 --out-dim 64 --head-hidden-dim 64 --head-bottleneck-dim 32 --batch-size 32 "
    "--eval-every 0 --epochs 2 --log-every 1 --device cuda --seed 3 --tensorboard false"
).split()


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_device_selection() -> None:
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda", world=2, local_rank=0) == torch.device("cuda:0")
    want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_precision("auto", torch.device("cuda")) == want


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_steps_on_the_gpu(tmp_path, precision) -> None:
    """fp16 runs with the GradScaler (bf16 and fp32 without): finite losses, a checkpoint."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    run = tmp_path / "run"
    assert main(["train", "--data", "fashion-mnist", *TINY_GPU, "--precision", precision,
                 "--output-dir", str(run)]) == 0  # fmt: skip
    got = losses(run)
    assert len(got) >= 8 and all(math.isfinite(v) for v in got)
    assert (run / "checkpoint.pth").is_file()


def test_batched_augmentation_on_the_gpu_equals_the_cpu() -> None:
    """The same seeded views on the GPU as on the CPU (up to float rounding)."""
    aug = make_aug()
    imgs = images(6, 3, size=40)
    idx = np.arange(6)
    on_cpu = aug(imgs, idx, epoch=1, seed=5)
    on_gpu = aug(imgs.cuda(), idx, epoch=1, seed=5)
    for c, g in zip(on_cpu, on_gpu, strict=True):
        assert g.is_cuda and g.shape == c.shape
        diff = (g.cpu() - c).abs()
        assert float(diff.mean()) < 1e-3 and float(diff.max()) < 0.05


def test_ddp_over_nccl_on_one_gpu(tmp_path) -> None:
    """A DDP step over an NCCL group of one process gives the plain step's gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1,
        device_id=torch.device("cuda", 0),
    )  # fmt: skip
    try:
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        plain = plain.cuda()
        ddp = DistributedDataParallel(copy.deepcopy(plain), device_ids=[0])
        x = torch.randn(32, 8, device="cuda")
        plain(x).square().mean().backward()
        ddp(x).square().mean().backward()
        for a, b in zip(plain.parameters(), ddp.module.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad)
        t = torch.arange(4.0, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        dist.destroy_process_group()


def _train_flags() -> str:
    return subprocess.run(
        [sys.executable, "-m", "dino", "train", "--help"], capture_output=True, text=True
    ).stdout


@pytest.mark.parametrize("flags", [["--accumulate", "2"], ["--checkpoint-activations"]])
def test_memory_flags_on_the_gpu(tmp_path, flags) -> None:
    """The memory-saving flags train on the GPU (skipped where this version lacks them)."""
    help_text = _train_flags()
    if flags[0] not in help_text:
        pytest.skip(f"dino train has no {flags[0]}")
    if len(flags) == 1 and f"{flags[0]} BOOL" in help_text:  # a config field takes a value
        flags = [*flags, "true"]
    run = tmp_path / "run"
    assert main(["train", "--data", "fashion-mnist", *TINY_GPU, "--precision", "bf16", *flags,
                 "--output-dir", str(run)]) == 0  # fmt: skip
    assert all(math.isfinite(v) for v in losses(run))
