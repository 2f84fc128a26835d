"""The parts of a training step one at a time, our implementation vs the plain one.

What each optimization of ``train_step`` buys on the recipe's networks (ViT-S/16 + head with
K = 65536; ``--preset`` for another): the optimizer (AdamW per-parameter loop, foreach, fused),
the teacher EMA and the per-parameter clipping (Python loop vs foreach), the loss (one
log-softmax per view vs one per pair, forward and backward) and the teacher forward (no_grad vs
inference_mode), and a convnet student in NCHW vs channels-last. Every pair is timed interleaved.

    python benchmarks/step_parts.py
"""

from __future__ import annotations

import argparse
import copy

import torch
from baseline import PlainDINOLoss, clip_gradients
from harness import interleave, machine_name, paired_speedup, save_results, stamp, table

from dino.config_load import load_config
from dino.loss import DINOLoss
from dino.training.networks import build_networks
from dino.training.optim import param_groups
from dino.training.step import clip_per_parameter, ema_update


def ema_loop(teacher: torch.nn.Module, student: torch.nn.Module, m: float) -> None:
    """The reference's EMA: one parameter at a time."""
    with torch.no_grad():
        for q, k in zip(student.parameters(), teacher.parameters(), strict=True):
            k.data.mul_(m).add_((1 - m) * q.detach().data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.preset)
    torch.manual_seed(0)
    student, teacher = build_networks(cfg)
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    rows = []

    def compare(part: str, variants: dict, ours: str, plain: str) -> None:
        times = interleave(variants, args.rounds)
        for name in variants:
            ms = 1000 * sorted(times[name])[len(times[name]) // 2]
            row = {"part": part, "variant": name, "ms": ms}
            if name != plain:
                row["x_vs_plain"] = paired_speedup(times[name], times[plain])
            row["ours"] = "yes" if name == ours else ""
            rows.append(row)
            print(row, flush=True)

    # optimizer: same state, three implementations (each its own copy of the weights)
    optims = {}
    for name, kw in {"loop": {"foreach": False}, "foreach": {"foreach": True}}.items():
        net = copy.deepcopy(student)
        for p, q in zip(net.parameters(), student.parameters(), strict=True):
            p.grad = None if q.grad is None else q.grad.clone()
        optims[name] = torch.optim.AdamW(param_groups(net), lr=1e-4, **kw)
    optims["fused"] = torch.optim.AdamW(param_groups(student), lr=1e-4, fused=True)
    compare("AdamW step", {k: o.step for k, o in optims.items()}, "fused", "loop")
    del optims

    compare(
        "teacher EMA",
        {
            "loop": lambda: ema_loop(teacher, student, 0.996),
            "foreach": lambda: ema_update(teacher, student, 0.996),
        },
        "foreach",
        "loop",
    )
    compare(
        "per-parameter clipping",
        {
            "loop": lambda: clip_gradients(student, 3.0),
            "foreach": lambda: clip_per_parameter(params, 3.0),
        },
        "foreach",
        "loop",
    )

    b, k, n_views = args.batch_size, cfg.model.out_dim, 2 + cfg.data.local_crops
    s_out = torch.randn(n_views * b, k, requires_grad=True)
    t_out = torch.randn(2 * b, k)
    ours_loss, plain_loss = DINOLoss(k), PlainDINOLoss(k, n_views)

    def loss_step(fn) -> None:
        out = fn(s_out, t_out, 0.04)
        (out[0] if isinstance(out, tuple) else out).backward()

    compare(
        f"loss fwd+bwd ({n_views} views x {b}, K={k})",
        {"per pair": lambda: loss_step(plain_loss), "per view": lambda: loss_step(ours_loss)},
        "per view",
        "per pair",
    )

    views = [torch.randn(b, 3, cfg.data.global_size, cfg.data.global_size)] * 2
    dtype = torch.bfloat16

    def teacher_forward(mode) -> None:
        with torch.autocast("cpu", dtype=dtype), mode():
            teacher(views)

    compare(
        "teacher forward (bf16)",
        {
            "no_grad": lambda: teacher_forward(torch.no_grad),
            "inference_mode": lambda: teacher_forward(torch.inference_mode),
        },
        "no_grad",
        "no_grad",
    )

    # convnets: NCHW (PyTorch's default) vs channels-last weights and inputs, as build_networks
    # sets them up; the student's forward and backward of the recipe's views under bf16
    rn_cfg = load_config("resnet50")
    rn, _ = build_networks(rn_cfg)
    rn_plain = copy.deepcopy(rn).to(memory_format=torch.contiguous_format)
    rn_plain.channels_last = False
    rb = max(1, b // 4)
    d = rn_cfg.data
    rn_views = [torch.randn(rb, 3, d.global_size, d.global_size)] * 2
    rn_views += [torch.randn(rb, 3, d.local_size, d.local_size)] * d.local_crops

    def convnet_step(net) -> None:
        with torch.autocast("cpu", dtype=dtype):
            out = net(rn_views)
        out.float().square().mean().backward()

    compare(
        f"ResNet-50 student fwd+bwd (bf16, batch {rb})",
        {"NCHW": lambda: convnet_step(rn_plain), "channels_last": lambda: convnet_step(rn)},
        "channels_last",
        "NCHW",
    )
    cols = ["part", "variant", "ms", "x_vs_plain", "ours"]
    print(table(rows, cols, f"step parts, {args.preset} networks, batch {b} (median ms)"))
    if not args.no_save:
        device = torch.device("cpu")
        result = {**stamp(device), "batch": b, "rows": rows}
        path = save_results(machine_name(device), "step_parts", args.preset, result)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
