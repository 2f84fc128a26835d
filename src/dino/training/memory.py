"""Memory a run needs, checked before anything is allocated, and allocation failures as one line.

:func:`check_memory` estimates a lower bound of what training holds at once: the DINO heads
(student and teacher, the student's gradients and AdamW's two moments), the head outputs of one
step (every crop of the batch, with their softmax and gradient) and the k-NN feature bank; a
setting whose estimate exceeds the memory available on the device (CPU: ``MemAvailable`` of
``/proc/meminfo``; CUDA: ``torch.cuda.mem_get_info``) is refused, naming the flag that makes it
large. The backbone and its activations are not counted, so a refused setting surely does not
fit; one that passes can still fail, and :func:`out_of_memory_message` turns the allocator's
error into one line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dino.config import Config
from dino.errors import DinoError
from dino.models.backbones import VIT_SIZES

FLOAT = 4  # bytes: parameters, gradients and optimizer states are fp32
GB = 1e9


def embed_dim(arch: str) -> int:
    """The feature width of ``arch`` (ResNet-50: 2048; 0 when unknown)."""
    if arch in VIT_SIZES:
        return VIT_SIZES[arch][0]
    return 2048 if arch.startswith("resnet") else 0


def head_parameters(cfg: Config) -> int:
    """Weights of one DINO head: the MLP (embed -> hidden -> hidden -> bottleneck) and the last
    layer (bottleneck -> out_dim)."""
    m = cfg.model
    hidden, bottleneck = m.head_hidden_dim, m.head_bottleneck_dim
    mlp = embed_dim(m.arch) * hidden + hidden * hidden + hidden * bottleneck
    return mlp + bottleneck * m.out_dim


def estimates(cfg: Config, n_train: int) -> dict[str, tuple[float, str, str]]:
    """Bytes of each part: ``{part: (bytes, flag, what)}``."""
    m, d = cfg.model, cfg.data
    head = head_parameters(cfg)
    crops = 2 + d.local_crops
    logits = cfg.optim.batch_size * crops * m.out_dim
    bank = n_train * embed_dim(m.arch) if cfg.run.eval_every or cfg.run.knn_k else 0
    return {
        "head": (
            5 * FLOAT * head,
            "--out-dim" if m.head_bottleneck_dim * m.out_dim * 2 > head else "--head-hidden-dim",
            f"the DINO heads ({head:,} weights each: the student's, its gradient, AdamW's two "
            "moments and the teacher's)",
        ),
        "outputs": (
            3 * FLOAT * logits,
            "--out-dim" if m.out_dim > 65536 else "--batch-size",
            f"one step's head outputs ({cfg.optim.batch_size} images x {crops} crops x "
            f"{m.out_dim} dimensions, with their softmax and gradient)",
        ),
        "bank": (
            FLOAT * bank,
            "--subset",
            f"the k-NN bank ({n_train} images x {embed_dim(m.arch)} features)",
        ),
    }


def available_bytes(device: torch.device) -> int | None:
    """Memory free on ``device`` now (None when it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(cfg: Config, device: torch.device, n_train: int) -> None:
    """Refuse a setting whose tensors cannot fit on ``device`` (:mod:`dino.training.memory`)."""
    free = available_bytes(device)
    if free is None:
        return
    parts = estimates(cfg, n_train)
    total = sum(size for size, _, _ in parts.values())
    if total <= free:
        return
    size, flag, what = max(parts.values(), key=lambda p: p[0])
    value = {"--out-dim": cfg.model.out_dim, "--head-hidden-dim": cfg.model.head_hidden_dim}
    value |= {"--batch-size": cfg.optim.batch_size, "--subset": cfg.data.subset}
    raise DinoError(
        f"{flag} {value[flag]} needs more memory than the {device.type.upper()} has: "
        f"{what} take {size / GB:.1f} GB, at least {total / GB:.1f} GB in all, and "
        f"{free / GB:.1f} GB are available; lower {flag}"
    )


def out_of_memory_message(exc: BaseException) -> str | None:
    """One line for an allocation failure (CPU or CUDA), or None if ``exc`` is not one."""
    text = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text.lower())
    ):
        first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
        return (
            f"out of memory ({first}); lower --batch-size, --out-dim or the image sizes, use "
            "--precision bf16/fp16 on a GPU, or free memory used by other processes"
        )
    return None
