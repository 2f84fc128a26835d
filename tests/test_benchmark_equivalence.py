"""Our training step and the plain baseline of ``benchmarks/`` compute the same thing.

The speed-ups of ``benchmarks/train_step.py`` are ratios against ``benchmarks/baseline.py``; they
mean something only if both steps do the same work: same loss on the same batch from the same
weights (fp32 to 1e-5 relative, bf16 within bf16 tolerance), and the same weights afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import train_step

        yield train_step
    finally:
        sys.path.remove(str(BENCHMARKS))


def _args(bench, precision: str = "fp32", drop_path: float = 0.1):
    return bench.parse_args(
        [
            "--arch", "vit_pico", "--patch-size", "4", "--depth", "2", "--batch-size", "4",
            "--global-size", "16", "--local-size", "8", "--local-crops", "3", "--out-dim", "64",
            "--drop-path-rate", str(drop_path), "--device", "cpu", "--precision", precision,
        ]
    )  # fmt: skip


def _pair(bench, precision: str, baseline_precision: str | None = None, drop_path: float = 0.1):
    args = _args(bench, precision, drop_path)
    device = torch.device("cpu")
    views = bench.make_views(bench.build_config(args, precision), device)
    ours = bench.build_impl(bench.Impl("ours", precision), args, views, device)
    base_impl = bench.Impl("baseline", baseline_precision or precision)
    base = bench.build_impl(base_impl, args, views, device)
    return ours, base


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_fp32_losses_and_weights_match_over_steps(bench) -> None:
    ours, base = _pair(bench, "fp32")
    for _ in range(3):  # later steps: updated weights, teacher EMA and center must agree too
        ours()
        base()
        assert _rel(ours.last_loss, base.last_loss) <= 1e-5
    student = dict(ours.trainer.learner.student.backbone.named_parameters())
    for name, p in base.plain.student.backbone.named_parameters():
        torch.testing.assert_close(student[name], p, rtol=1e-4, atol=1e-6)
    teacher = dict(ours.trainer.learner.teacher.backbone.named_parameters())
    for name, p in base.plain.teacher.backbone.named_parameters():
        torch.testing.assert_close(teacher[name], p, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.trainer.learner.loss_fn.center, base.plain.loss.center)


def test_the_comparison_detects_a_different_network(bench) -> None:
    """The 1e-5 agreement above is not automatic: against a baseline whose student differs from
    ours by noise of std 1e-3 in one weight matrix, the same comparison fails by far."""
    ours, base = _pair(bench, "fp32")
    assert [v.shape[-1] for v in ours.views] == [16, 16, 8, 8, 8]  # 2 global + 3 local views
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = next(p for p in base.plain.student.parameters() if p.ndim == 2)
        w.add_(1e-3 * torch.randn(w.shape, generator=g))
    ours()
    base()
    assert _rel(ours.last_loss, base.last_loss) > 1e-4


@pytest.mark.parametrize("baseline_precision", ["bf16", "fp32"])
def test_bf16_loss_within_bf16_tolerance(bench, baseline_precision: str) -> None:
    ours, base = _pair(bench, "bf16", baseline_precision)
    ours()
    base()
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-8 ~ 0.4%) in every matmul
    assert _rel(ours.last_loss, base.last_loss) <= 2e-2


def test_step_counts_the_same_flops_for_any_batch(bench) -> None:
    args = _args(bench)
    device = torch.device("cpu")
    views = bench.make_views(bench.build_config(args), device)
    flops = bench.count_flops(args, views, device)
    flops_two = bench.count_flops(args, [v[:2] for v in views], device)
    assert flops > 0
    assert flops == pytest.approx(flops_two * views[0].shape[0] / 2)
