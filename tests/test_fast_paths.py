"""The faster implementations chosen by the benchmarks compute what the plain ones do.

(docs/performance.md: closed-form HSV -> RGB, torch.compile in place. The fused AdamW is checked
inside the whole step: tests/test_benchmark_equivalence.py compares our step, fused AdamW
included, with the plain step's weights after three steps.)
"""

from __future__ import annotations

import torch

from dino.config_load import load_config
from dino.data.photometric import hsv_to_rgb, rgb_to_hsv


def _table_hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """torchvision's six-sector table formulation."""
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rows = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
    table = torch.stack([torch.stack(c, 1) for c in rows], 1)  # [B, 6, 3, H, W]
    return table.gather(1, i[:, None, None].expand(-1, 1, 3, -1, -1)).squeeze(1)


def test_hsv_to_rgb_closed_form_equals_the_table() -> None:
    hsv = torch.rand(4, 3, 17, 19)
    hsv[0, 0, 0, :6] = torch.tensor([0.0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])  # sector edges
    hsv[1, 1] = 0.0  # no saturation: gray
    torch.testing.assert_close(hsv_to_rgb(hsv), _table_hsv_to_rgb(hsv), rtol=0, atol=2e-6)


def test_hsv_round_trip() -> None:
    rgb = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, rtol=0, atol=2e-6)


def _tiny_cfg(**overrides):
    base = {"arch": "vit_pico", "patch_size": 4, "depth": 1, "global_size": 8, "local_size": 4}
    return load_config(None, {**base, "out_dim": 16, "head_hidden_dim": 8, **overrides})


def test_compile_keeps_parameter_names(tmp_path) -> None:
    """``run.compile`` compiles the networks in place: checkpoints keep their keys (compiling
    itself happens at the first forward, which this test does not run)."""
    from dino.training import Trainer

    cfg = _tiny_cfg(compile=True, batch_size=8, subset=64, output_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    plain = Trainer(_tiny_cfg(batch_size=8, subset=64, output_dir=str(tmp_path / "plain")))
    student, plain_student = trainer.learner.student, plain.learner.student
    assert student.state_dict().keys() == plain_student.state_dict().keys()
    assert not any("_orig_mod" in k for k in trainer.state()["teacher"])
