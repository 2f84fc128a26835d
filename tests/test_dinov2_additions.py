"""DINOv2's additions against their definitions: KoLeo, Sinkhorn-Knopp centering, register
tokens, iBOT's masked-patch loss and its block masks."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers.faults import install_stop_before_step

from dino.cli import main
from dino.data.masking import block_mask, ibot_masks
from dino.eval.attention import cls_attention
from dino.loss import DINOLoss, IBOTPatchLoss, koleo_loss, sinkhorn_knopp
from dino.loss.ibot_patch import patch_weights
from dino.models.arch_detect import detect_arch
from dino.models.backbones import build_backbone, vit_tokens
from dino.models.weights import load_backbone
from dino.training.checkpoint import load_checkpoint

torch.set_num_threads(1)


# ---------------------------------------------------------------- KoLeo


def circle(degrees: list[float]) -> torch.Tensor:
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1).float()


def chord(degrees: float) -> float:
    """Distance between two unit vectors ``degrees`` apart."""
    return 2 * math.sin(math.radians(degrees) / 2)


def test_koleo_is_minus_mean_log_distance_to_the_nearest_neighbour() -> None:
    # 0 and 10 degrees are each other's neighbours; 100 degrees' nearest is 10 (90 apart)
    x = circle([0, 10, 100])
    want = -(2 * math.log(chord(10)) + math.log(chord(90))) / 3
    assert koleo_loss(x).item() == pytest.approx(want, abs=1e-5)
    # features are L2-normalized first: scaling them changes nothing
    scaled = x * torch.tensor([[3.0], [0.5], [7.0]])
    assert koleo_loss(scaled).item() == pytest.approx(want, abs=1e-5)
    # four points at right angles: every nearest neighbour is sqrt(2) away
    assert koleo_loss(circle([0, 90, 180, 270])).item() == pytest.approx(
        -math.log(math.sqrt(2)), abs=1e-5
    )


def test_koleo_gradient_spreads_the_closest_pair() -> None:
    x = circle([0, 10, 100]).requires_grad_(True)
    koleo_loss(x).backward()
    with torch.no_grad():
        moved = F.normalize(x - 0.01 * x.grad, dim=1)
    angles = torch.atan2(moved[:, 1], moved[:, 0]) * 180 / math.pi
    assert float(angles[1] - angles[0]) > 10.0  # the closest two moved apart
    assert koleo_loss(moved).item() < koleo_loss(x.detach()).item()


def test_koleo_of_fewer_than_two_features_is_zero() -> None:
    assert koleo_loss(torch.randn(1, 4)).item() == 0.0


# ---------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_rows_are_distributions_and_columns_balance() -> None:
    torch.manual_seed(0)
    n, k = 12, 6
    logits = torch.randn(n, k)
    logits[:, 0] += 2.0  # every sample prefers prototype 0
    q = sinkhorn_knopp(logits, 0.1)
    assert q.shape == (n, k) and torch.all(q >= 0)
    torch.testing.assert_close(q.sum(1), torch.ones(n), atol=1e-5, rtol=0)  # rows: exactly 1
    # columns: each prototype gets N/K of the mass, closer after every iteration
    softmax_spread = float((F.softmax(logits / 0.1, 1).sum(0) - n / k).abs().max())
    spread = [
        float((sinkhorn_knopp(logits, 0.1, it).sum(0) - n / k).abs().max()) for it in (1, 3, 200)
    ]
    assert softmax_spread > 3.0  # the softmax gives prototype 0 most of the batch
    assert spread[0] > spread[1] > spread[2]
    assert spread[2] < 1e-5  # converged: every prototype holds N/K


def test_sinkhorn_ignores_a_common_shift_and_cannot_overflow() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 5)
    q = sinkhorn_knopp(logits, 0.04)
    torch.testing.assert_close(sinkhorn_knopp(logits + 30.0, 0.04), q, atol=1e-6, rtol=1e-5)
    # a sharp teacher: exp(logits / 0.04) spans far more than float32 holds
    big = sinkhorn_knopp(logits * 10.0, 0.04)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big.sum(1), torch.ones(8), atol=1e-5, rtol=0)
    assert float(big.sum(0).min()) > 0  # every prototype still gets some of the batch


def test_dino_loss_with_sinkhorn_uses_sinkhorn_targets_and_no_center() -> None:
    torch.manual_seed(2)
    teacher, student = torch.randn(2 * 4, 6), torch.randn(3 * 4, 6)
    loss_fn = DINOLoss(6, centering="sinkhorn")
    targets = loss_fn.targets(teacher, 0.05)
    torch.testing.assert_close(
        targets.probs.flatten(0, 1), sinkhorn_knopp(teacher, 0.05), atol=0, rtol=0
    )
    loss_fn.apply_center_update()
    assert torch.equal(loss_fn.center, torch.zeros(1, 6))
    loss, stats = loss_fn(student, teacher, 0.05)
    assert torch.isfinite(loss) and float(stats.kl) >= -1e-5


def _sinkhorn_worker(rank: int, init: str, world: int) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same global batch on every process
        logits = torch.randn(10, 7) * 2
        rows = slice(rank * 5, (rank + 1) * 5)
        local = sinkhorn_knopp(logits[rows], 0.1)
        dist.destroy_process_group()  # the reference: one process holding all rows
        torch.testing.assert_close(local, sinkhorn_knopp(logits, 0.1)[rows], atol=1e-6, rtol=1e-5)
        # iBOT's EMA center: the mean over processes of each one's masked-patch mean
        dist.init_process_group("gloo", init_method=init + "2", rank=rank, world_size=world)
        patches = torch.randn(3 + 4 * rank, 7) + rank
        ibot = IBOTPatchLoss(7, center_momentum=0.5)
        ibot.targets(patches, 0.1)
        ibot.apply_center_update()
        means = [torch.zeros(1, 7) for _ in range(world)]
        dist.all_gather(means, patches.mean(0, keepdim=True))
        torch.testing.assert_close(ibot.center, 0.5 * torch.cat(means).mean(0, keepdim=True))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(0)  # as in test_distributed.py: skip a flaky C++ teardown after the checks


@pytest.mark.slow
def test_sinkhorn_and_ibot_center_on_two_processes_match_one(tmp_path) -> None:
    """The sums are all-reduced: rows split over 2 processes get the targets one process gives
    them when it holds all rows."""
    mp.spawn(_sinkhorn_worker, args=(f"file://{tmp_path}/pg", 2), nprocs=2, join=True)


# ---------------------------------------------------------------- registers


def test_registers_add_tokens_but_not_feature_size() -> None:
    torch.manual_seed(0)
    plain = build_backbone("vit_pico", 7, 28, depth=1).eval()
    reg = build_backbone("vit_pico", 7, 28, depth=1, registers=4).eval()
    x = torch.randn(2, 3, 28, 28)
    tokens = {}
    for name, model in (("plain", plain), ("reg", reg)):
        keep = lambda m, i, o, n=name: tokens.setdefault(n, o)  # noqa: E731
        hook = model.blocks[0].register_forward_hook(keep)
        with torch.no_grad():
            feature = model(x)
            cls, patches = vit_tokens(model, x)
        hook.remove()
        assert feature.shape == (2, 96) and torch.equal(feature, cls)
        assert patches.shape == (2, 16, 96)  # the 4x4 patches, no [CLS], no registers
    assert tokens["plain"].shape[1] == 1 + 16
    assert tokens["reg"].shape[1] == 1 + 4 + 16
    assert reg.reg_token.shape == (1, 4, 96)
    assert reg.pos_embed.shape == (1, 16, 96)  # patches only: [CLS] and registers get none


def test_attention_maps_of_a_vit_with_registers_leave_the_registers_out() -> None:
    torch.manual_seed(0)
    model = build_backbone("vit_pico", 4, 24, depth=2, registers=3).eval()
    last = model.blocks[-1].attn
    last.fused_attn = False
    seen = {}
    hook = last.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("attn", o))
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        model(x)
    hook.remove()
    want = seen["attn"][:, :, 0, 1 + 3 :].reshape(2, last.num_heads, 6, 6)
    got = cls_attention(model, x)
    assert got.shape == (2, last.num_heads, 6, 6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_checkpoint_with_registers_loads_with_them(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_backbone("vit_pico", 7, 28, depth=2, registers=2).eval()
    with torch.no_grad():
        model.reg_token.normal_()  # so that loading without them would show
    state = model.state_dict()
    found = detect_arch(state)
    assert found is not None
    assert (found["registers"], found["img_size"], found["depth"]) == (2, 28, 2)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "c.pth")
    loaded = load_backbone(tmp_path / "c.pth")
    assert loaded.reg_token.shape == (1, 2, 96)
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)


def test_a_backbone_with_registers_exports_to_timm(tmp_path) -> None:
    import timm

    from dino.models.export import export_backbone

    torch.manual_seed(1)
    model = build_backbone("vit_pico", 7, 28, depth=2, registers=3).eval()
    with torch.no_grad():
        model.reg_token.normal_()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    out = export_backbone(tmp_path / "backbone.pth", tmp_path / "export", onnx=False)
    kwargs = out["dino"]["timm"]["kwargs"]
    assert kwargs["reg_tokens"] == 3 and kwargs["no_embed_class"] is True
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True, num_classes=0)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- iBOT


def test_ibot_loss_is_the_target_entropy_when_the_student_matches_the_teacher() -> None:
    torch.manual_seed(3)
    masks = torch.zeros(4, 9, dtype=torch.bool)  # 4 global views of 9 patches
    masks[0, :2] = True
    masks[2, 3:8] = True  # views 1 and 3 are not masked
    m, k = int(masks.sum()), 5
    loss_fn = IBOTPatchLoss(k, student_temp=0.1)
    targets = loss_fn.targets(torch.randn(m, k), 0.07)
    # a student whose softmax at tau_s is the target: zero KL, loss = target entropy
    student = (0.1 * targets.log()).requires_grad_(True)
    weights = patch_weights(masks)
    loss = loss_fn(student, targets, weights, n_images=4)
    entropy = -(targets * targets.log()).sum(1)
    want = (entropy[:2].mean() + entropy[2:].mean()) / 4  # per-image means over 4 views
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    loss.backward()
    assert float(student.grad.abs().max()) < 1e-5  # a minimum: the KL is zero
    other = loss_fn(torch.randn(m, k), targets, weights, n_images=4)
    assert other.item() > loss.item()


def test_ibot_targets_are_centered_by_their_own_ema_center() -> None:
    torch.manual_seed(4)
    loss_fn = IBOTPatchLoss(5, center_momentum=0.9)
    first = torch.randn(6, 5)
    torch.testing.assert_close(loss_fn.targets(first, 0.1), F.softmax(first / 0.1, dim=1))
    second = torch.randn(3, 5)
    got = loss_fn.targets(second, 0.1)  # the center now holds 0.1 x the first batch's mean
    center = 0.1 * first.mean(0, keepdim=True)
    torch.testing.assert_close(got, F.softmax((second - center) / 0.1, dim=1))


def test_patch_weights_make_each_masked_image_weigh_one() -> None:
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(patch_weights(masks), torch.tensor([0.5, 0.5] + [0.25] * 4))


def test_masked_patches_take_the_mask_token() -> None:
    torch.manual_seed(5)
    model = build_backbone("vit_pico", 7, 28, depth=1).eval()
    x = torch.randn(3, 3, 28, 28)
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[1, [0, 5, 6]] = True
    token = torch.randn(1, 96)
    with torch.no_grad():
        cls, patches = vit_tokens(model, x)
        mcls, mpatches = vit_tokens(model, x, masks, token)
        # the mask token replaces the patch embedding, then positions are added as usual
        same = x.clone()
        same[1] = 0.0  # an input whose embeddings differ everywhere from the masked one's
    assert torch.equal(mcls[[0, 2]], cls[[0, 2]]) and torch.equal(mpatches[0], patches[0])
    assert not torch.allclose(mpatches[1], patches[1])
    # the masked positions no longer depend on the pixels under them
    x2 = x.clone()
    x2[1, :, :7, :7] += 5.0  # patch 0 of image 1 (masked)
    with torch.no_grad():
        again = vit_tokens(model, x2, masks, token)[1]
    torch.testing.assert_close(again[1], mpatches[1])


# ---------------------------------------------------------------- masks


def test_ibot_masks_mask_half_the_views_over_the_ratio_range() -> None:
    rng = np.random.default_rng(0)
    n_views, grid = 64, (14, 14)
    masks = ibot_masks(n_views, grid, rng, (0.1, 0.5), 0.5)
    assert masks.shape == (64, 196) and masks.dtype == bool
    counts = np.sort(masks.sum(1))
    assert (counts > 0).sum() == 32  # int(64 x 0.5) views masked
    masked = counts[32:]
    assert masked.min() >= 1 and masked.max() <= int(196 * 0.5)
    # one ratio per slice of [0.1, 0.5]: the masked counts spread over the whole range
    assert masked[0] < 0.15 * 196 and masked[-1] > 0.45 * 196
    assert abs(masked.mean() / 196 - 0.3) < 0.03
    # the masked views are shuffled among all views
    assert masks[:32].any(1).sum() not in (0, 32)


def test_block_masks_reach_their_target_with_blocks() -> None:
    rng = np.random.default_rng(1)
    for target in (10, 40, 90):
        m = block_mask((14, 14), target, rng)
        assert m.sum() <= target and m.sum() >= target - 3  # small leftovers may not fit
    # on the 4x4 grid of a 28-px view with 7-px patches, blocks of 2 to 8 patches fit
    for target in (2, 5, 8):
        counts = np.array([block_mask((4, 4), target, rng).sum() for _ in range(50)])
        assert counts.max() <= target and counts.mean() > target - 0.2


def test_masks_are_a_function_of_the_generator_seed() -> None:
    a = ibot_masks(16, (4, 4), np.random.default_rng(7))
    b = ibot_masks(16, (4, 4), np.random.default_rng(7))
    c = ibot_masks(16, (4, 4), np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---------------------------------------------------------------- in the training step

TINY_RUN = [
    "train", "--data", "fashion-mnist", "--subset", "64", "--arch", "vit_pico", "--depth", "1",
    "--patch-size", "7", "--global-size", "28", "--local-size", "14", "--local-crops", "2",
    "--out-dim", "32", "--head-hidden-dim", "32", "--head-bottleneck-dim", "16",
    "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "0.5", "--precision", "fp32",
    "--device", "cpu", "--log-every", "1", "--eval-every", "0", "--num-workers", "0",
    "--tensorboard", "false", "--knn-k", "5", "--drop-path-rate", "0.1",
]  # fmt: skip
EVERY_ADDITION = [
    "--koleo-weight", "0.1", "--ibot-weight", "1.0", "--registers", "2",
    "--ibot-separate-head", "true",
]  # fmt: skip


def metric_rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_off_by_default_the_run_holds_nothing_of_the_additions(tmp_path) -> None:
    # the library's defaults (the fashion-mnist preset that --data fashion-mnist picks has KoLeo)
    main([*TINY_RUN, "--config", "default", "--epochs", "1", "--output-dir", str(tmp_path / "run")])
    state = load_checkpoint(tmp_path / "run")
    assert "ibot_loss" not in state
    assert not any(k.startswith(("mask_token", "patch_head")) for k in state["student"])
    assert "backbone.reg_token" not in state["student"]
    rows = metric_rows(tmp_path / "run")
    assert rows and not any("koleo_loss" in r or "ibot_loss" in r for r in rows)


def test_a_run_with_every_addition_trains_them_and_saves_them(tmp_path) -> None:
    run = tmp_path / "run"
    main([*TINY_RUN, *EVERY_ADDITION, "--centering", "sinkhorn", "--output-dir", str(run)])
    rows = metric_rows(run)
    assert len(rows) == 8
    for r in rows:
        assert math.isfinite(r["koleo_loss"]) and math.isfinite(r["ibot_loss"])
        assert r["ibot_loss"] > 0
    state = load_checkpoint(run)
    student, teacher = state["student"], state["teacher"]
    assert student["backbone.reg_token"].shape == (1, 2, 96)
    assert student["mask_token"].abs().sum() > 0  # it learned (it starts at zero)
    assert any(k.startswith("patch_head.") for k in student)
    assert set(student) == set(teacher)
    assert "ibot_loss" in state
    # the exported teacher backbone loads with its registers, without mask token or heads
    backbone = load_backbone(run / "teacher_backbone.pth")
    assert backbone.reg_token.shape == (1, 2, 96)
    net = build_backbone("vit_pico", 7, 28, depth=1, registers=2).eval()
    net.load_state_dict({k[9:]: v for k, v in teacher.items() if k.startswith("backbone.")})
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), net(x), atol=1e-6, rtol=0)


def test_resumed_run_with_ibot_and_koleo_matches_an_uninterrupted_one(
    tmp_path, monkeypatch
) -> None:
    """The iBOT center, mask token and patch head are run state; a step's masks depend only on
    (seed, iteration, process): a run stopped after step 3 and resumed ends bit-identical."""
    args = [*TINY_RUN, *EVERY_ADDITION]
    main([*args, "--output-dir", str(tmp_path / "ref")])
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        install_stop_before_step(m, 3)
        with pytest.raises(SystemExit):
            main([*args, "--output-dir", str(run)])
    assert load_checkpoint(run)["iteration"] == 3
    main(["train", "--resume", str(run)])
    ref, got = load_checkpoint(tmp_path / "ref"), load_checkpoint(run)
    for key in ("student", "teacher", "ibot_loss", "dino_loss"):
        assert ref[key].keys() == got[key].keys()
        for name in ref[key]:
            assert torch.equal(ref[key][name], got[key][name]), (key, name)
    assert torch.count_nonzero(got["ibot_loss"]["center"]) > 0
    assert metric_rows(run) == metric_rows(tmp_path / "ref")
