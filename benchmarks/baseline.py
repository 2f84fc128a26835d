"""A plain, paper-faithful DINO training step: the yardstick of ``benchmarks/train_step.py``.

Written the way the reference implementation writes it, without any of our speed-ups:

* its own ViT, attention spelled out as ``softmax(QK^T / sqrt(d)) V`` (no fused kernel);
* the multi-crop wrapper: one backbone call per run of same-sized crops, one head call;
* the loss: a Python loop over (teacher view, student view) pairs that recomputes the student's
  log-softmax for every pair;
* per-parameter gradient clipping and the teacher EMA as Python loops over the parameters;
* ``torch.optim.AdamW`` with its defaults (a per-parameter loop on CPUs);
* fp32, or autocast around the forward passes and the loss when asked (as the reference does).

It loads the weights of our networks (same parameter names as timm and the reference code), so
both steps start from the same state and must compute the same loss on the same batch
(``tests/test_benchmark_equivalence.py``). It lives in ``benchmarks/`` only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PlainAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class PlainMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop each sample's residual branch with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class PlainBlock(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PlainAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = PlainMlp(dim, 4 * dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class _Patches(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PlainViT(nn.Module):
    """The reference ViT: patch embedding, [CLS] + learned positions (bicubic-resized to each
    crop's grid), pre-norm blocks, final norm; returns the [CLS] token."""

    def __init__(
        self, dim: int, depth: int, heads: int, patch: int, img_size: int, drop_path_rate: float
    ) -> None:
        super().__init__()
        self.patch_embed = _Patches(patch, dim)
        self.grid = img_size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, dim))
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(*(PlainBlock(dim, heads, r) for r in rates))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def positions(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        # as the reference's interpolate_pos_encoding: bicubic, scale (new + 0.1) / old, no
        # antialiasing
        scale = ((h + 0.1) / self.grid, (w + 0.1) / self.grid)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, D, h, w]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.positions(h, w)
        return self.norm(self.blocks(x))[:, 0]


class PlainHead(nn.Module):
    """MLP, L2 normalization, weight-normalized last layer ``w = g v / ||v||`` (row-wise)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1)
        mlp: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            mlp += [nn.Linear(d_in, d_out), nn.GELU()]
        mlp.append(nn.Linear(dims[-1], bottleneck))
        self.mlp = nn.Sequential(*mlp)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = nn.Parameter(torch.zeros(out_dim, bottleneck))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return x @ w.t()


class PlainMultiCrop(nn.Module):
    """The reference ``MultiCropWrapper``."""

    def __init__(self, backbone: PlainViT, head: PlainHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
        start, feats = 0, []
        for end in ends.tolist():
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(feats))


def plain_network(ours: nn.Module, drop_path_rate: float) -> PlainMultiCrop:
    """A :class:`PlainMultiCrop` with the architecture and the weights of our ``MultiCropNet``
    (a ViT backbone of :mod:`dino.models.backbones`, a :class:`~dino.models.head.DINOHead`)."""
    bb, head = ours.backbone, ours.head
    dim = bb.embed_dim
    heads = bb.blocks[0].attn.num_heads
    patch = bb.patch_embed.patch_size[0]
    img = bb.patch_embed.img_size[0]
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    v = head.last_layer.parametrizations.weight.original1
    net = PlainMultiCrop(
        PlainViT(dim, len(bb.blocks), heads, patch, img, drop_path_rate),
        PlainHead(dim, v.shape[0], linears[0].out_features, v.shape[1], len(linears)),
    )
    state = {f"backbone.{k}": t for k, t in bb.state_dict().items()}
    # the same Linear-GELU layout as DINOHead without BatchNorm, so the same indices
    state.update({f"head.{k}": t for k, t in head.state_dict().items() if k.startswith("mlp.")})
    state["head.weight_g"] = head.last_layer.parametrizations.weight.original0.detach()
    state["head.weight_v"] = v.detach()
    net.load_state_dict(state)
    net.head.weight_g.requires_grad_(
        head.last_layer.parametrizations.weight.original0.requires_grad
    )
    return net


class PlainDINOLoss(nn.Module):
    """The reference loss: a loop over view pairs, log-softmax recomputed per pair."""

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, momentum=0.9):
        super().__init__()
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, temp: float):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, n = 0.0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total += loss.mean()
                n += 1
        total /= n
        self.update_center(teacher_output)
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        m = self.center_momentum
        self.center = self.center * m + batch_center * (1 - m)


def clip_gradients(model: nn.Module, clip: float) -> None:
    """The reference's per-parameter clipping, one parameter at a time."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)


class PlainStep:
    """Student, teacher, optimizer and loss of the plain implementation, and its step.

    Args:
        student, teacher: our ``MultiCropNet`` pair whose architecture and weights to copy.
        out_dim, ncrops: K and the number of views per image.
        drop_path_rate: stochastic depth of the student.
        clip_grad: per-parameter gradient norm limit (0: none).
        autocast_dtype: None for fp32, else the dtype of autocast around forward and loss.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        out_dim: int,
        ncrops: int,
        drop_path_rate: float,
        clip_grad: float = 3.0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        device = next(student.parameters()).device
        self.student = plain_network(student, drop_path_rate).to(device)
        self.teacher = plain_network(teacher, 0.0).to(device)
        self.teacher.requires_grad_(False)
        self.loss = PlainDINOLoss(out_dim, ncrops, student_temp, center_momentum).to(device)
        decay = [p for n, p in self.student.named_parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [
            p for n, p in self.student.named_parameters() if p.requires_grad and p.ndim <= 1
        ]
        self.optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay}])
        self.clip_grad = clip_grad
        self.autocast_dtype = autocast_dtype
        self.device = device

    def step(
        self, images: list[torch.Tensor], lr: float, wd: float, momentum: float, temp: float
    ) -> float:
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            group["weight_decay"] = wd if i == 0 else 0.0
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
            loss = self.loss(student_output, teacher_output, temp)
        if not math.isfinite(loss.item()):
            raise FloatingPointError("the loss is not finite")
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip_grad:
            clip_gradients(self.student, self.clip_grad)
        self.optimizer.step()
        with torch.no_grad():
            for param_q, param_k in zip(
                self.student.parameters(), self.teacher.parameters(), strict=True
            ):
                param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
        return loss.item()
