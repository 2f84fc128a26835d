"""Fused ``scaled_dot_product_attention`` vs attention written out as ``softmax(QK^T)V``.

Forward + backward of one attention call at the token counts of our crops (ViT-S/16: 197 tokens
for 224 crops, 37 for 96; the Fashion-MNIST preset, ViT-pico/4: 50 for 28, 10 for 12), per
precision, timed interleaved. This is the measurement behind ``fused_attn`` in
``dino.models.backbones``.

    python benchmarks/attention.py            # table + results/<machine>.json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from harness import interleave, machine_name, paired_speedup, save_results, stamp, table

#: (label, batch, heads, tokens, head dim): the attention calls of one training step.
CASES = [
    ("vit_small 224 (global)", 32, 6, 197, 64),
    ("vit_small 96 (local)", 128, 6, 37, 64),
    ("fashion-mnist 28 (global)", 256, 3, 50, 32),
    ("fashion-mnist 12 (local)", 768, 3, 10, 32),
]


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the batch sizes")
    parser.add_argument("--no-save", action="store_true", help="do not write results/")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for precision in args.precision.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        for label, b, h, n, d in CASES:
            b = max(1, int(b * args.scale))
            q, k, v = (
                torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True)
                for _ in range(3)
            )
            grad = torch.randn(b, h, n, d, device=device, dtype=dtype)

            def step(fn, q=q, k=k, v=v, grad=grad) -> None:
                fn(q, k, v).backward(grad)

            ref = explicit(q, k, v)
            err = (fused(q, k, v) - ref).abs().max().item()
            times = interleave(
                {"explicit": lambda: step(explicit), "fused": lambda: step(fused)},
                args.rounds,
                device=device,
            )
            ms = {name: 1000 * sorted(times[name])[len(times[name]) // 2] for name in times}
            rows.append(
                {
                    "case": label,
                    "precision": precision,
                    "shape": f"{b}x{h}x{n}x{d}",
                    "explicit_ms": ms["explicit"],
                    "fused_ms": ms["fused"],
                    "fused_speedup": paired_speedup(times["fused"], times["explicit"]),
                    "max_abs_diff": err,
                }
            )
            print(rows[-1], flush=True)
    cols = ["case", "precision", "shape", "explicit_ms", "fused_ms", "fused_speedup"]
    print(table(rows, cols, "attention forward+backward (median ms; speed-up = explicit/fused)"))
    if not args.no_save:
        path = save_results(
            machine_name(device), "attention", "fwd_bwd", {**stamp(device), "rows": rows}
        )
        print(f"written to {path}")


if __name__ == "__main__":
    main()
