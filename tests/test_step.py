"""The training step (:func:`dino.training.step.train_step`) against the method's definitions, on
a random batch and a tiny ViT: no dataset, no Trainer."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from dino.config_load import load_config
from dino.training.distributed import Dist
from dino.training.learner import Learner, build_learner
from dino.training.schedules import Schedules, StepValues, shorten_warmups
from dino.training.step import train_step

TINY = {
    "arch": "vit_pico", "depth": 2, "patch_size": 4, "global_size": 16, "local_size": 8,
    "local_crops": 2, "out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
    "drop_path_rate": 0.0, "precision": "fp32", "device": "cpu", "koleo_weight": 0.0,
}  # fmt: skip


def tiny_learner(**overrides) -> Learner:
    return build_learner(
        load_config(None, {**TINY, **overrides}), Dist(), torch.device("cpu"), "fp32"
    )


def random_views(batch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [16, 16, 8, 8]  # two global views first, then the local ones
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def values(iteration: int = 5, **changes) -> StepValues:
    base = {"lr": 1e-3, "weight_decay": 0.04, "momentum": 0.9, "teacher_temp": 0.04}
    return StepValues(iteration, **{**base, "freeze_last_layer": False, **changes})


def params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


def test_teacher_is_the_ema_of_the_old_teacher_and_the_new_student() -> None:
    m = tiny_learner()
    with torch.no_grad():  # a teacher apart from the student, as after some steps
        for p in m.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    old_teacher = params(m.teacher)
    out = train_step(m, random_views(), values(momentum=0.9))
    assert "loss" in out and out["loss"] > 0
    new_student = params(m.student)
    for name, p in m.teacher.named_parameters():
        expected = 0.9 * old_teacher[name] + 0.1 * new_student[name]
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7, msg=name)


def test_center_is_the_ema_of_the_teacher_batch_mean() -> None:
    m = tiny_learner(center_momentum=0.8)
    m.loss_fn.center.normal_()  # a center that is not zero, as after some steps
    center = m.loss_fn.center.clone()
    views = random_views()
    with torch.no_grad():  # the teacher's outputs on the global views before the step
        logits = m.teacher(views[:2])
    train_step(m, views, values())
    torch.testing.assert_close(m.loss_fn.center, 0.8 * center + 0.2 * logits.mean(0, keepdim=True))


def test_gradients_reach_only_the_student() -> None:
    m = tiny_learner()
    student, teacher = params(m.student), params(m.teacher)
    train_step(m, random_views(), values(momentum=1.0))  # momentum 1: the teacher stays
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert changed(teacher, params(m.teacher)) == set()
    trainable = {n for n, p in m.student.named_parameters() if p.requires_grad}
    assert changed(student, params(m.student)) == trainable


def test_schedule_values_reach_the_optimizer() -> None:
    m = tiny_learner()
    train_step(m, random_views(), values(lr=3e-4, weight_decay=0.2))
    decay, no_decay = m.optimizer.param_groups
    assert decay["lr"] == no_decay["lr"] == 3e-4
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0


def test_last_layer_is_frozen_in_the_steps_the_schedule_says() -> None:
    """``freeze_last_layer: 1`` with 4 steps an epoch: steps 0-3 update every trainable
    parameter but the head's last layer (the reference drops its gradients), step 4 it too."""
    cfg = load_config(None, {**TINY, "epochs": 2, "freeze_last_layer": 1, "warmup_epochs": 0})
    sched = Schedules.build(cfg, steps_per_epoch=4, global_batch=8)
    assert [sched.at(i).freeze_last_layer for i in range(8)] == [True] * 4 + [False] * 4
    m = tiny_learner()
    trainable = {n for n, p in m.student.named_parameters() if p.requires_grad}
    last = {n for n in trainable if n.startswith("head.last_layer.")}
    assert last  # the weight-normed layer's directions (its norm is frozen at 1)
    for it, frozen in ((3, True), (4, False)):
        before = params(m.student)
        train_step(m, random_views(seed=it), values(it, freeze_last_layer=frozen))
        assert changed(before, params(m.student)) == (trainable - last if frozen else trainable)


def test_two_accumulated_batches_of_16_are_one_batch_of_32() -> None:
    """``--accumulate 2`` with 16 images a pass is one step of 32 images: the same loss, student,
    teacher and center, to float tolerance (KoLeo, a per-batch term, is off: TINY). SGD: AdamW
    divides each gradient by its running size, which makes the float noise of gradients that are
    0 in exact arithmetic (the attention's key bias) steps of size lr."""
    one, two = tiny_learner(optimizer="sgd"), tiny_learner(optimizer="sgd", accumulate=2)
    assert two.accumulate == 2
    views = random_views(batch=32)
    for it in range(3):  # several steps: the optimizer state and the teacher must agree too
        out1 = train_step(one, views, values(it))
        out2 = train_step(two, views, values(it))
        assert out2["loss"] == pytest.approx(out1["loss"], abs=1e-6)
        assert out2["teacher_entropy"] == pytest.approx(out1["teacher_entropy"], abs=1e-6)
    for net in ("student", "teacher"):
        a, b = params(getattr(one, net)), params(getattr(two, net))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(two.loss_fn.center, one.loss_fn.center)


def test_accumulation_is_not_two_steps_of_16() -> None:
    """The check above can fail: two optimizer steps of 16 give other weights."""
    one, halves = tiny_learner(), tiny_learner()
    views = random_views(batch=32)
    train_step(one, views, values(0))
    for rows in (slice(0, 16), slice(16, 32)):
        train_step(halves, [v[rows] for v in views], values(0))
    differ = changed(params(one.student), params(halves.student))
    assert differ


def test_activation_checkpointing_recomputes_the_blocks_and_changes_nothing() -> None:
    """``--checkpoint-activations``: each block runs again in the backward pass (its activations
    were not kept), and the step's loss and weights are those without it, drop path included
    (its random draws are replayed)."""
    plain = tiny_learner(drop_path_rate=0.2)
    ckpt = tiny_learner(drop_path_rate=0.2, checkpoint_activations=True)
    calls = {"plain": 0, "ckpt": 0}
    for name, m in (("plain", plain), ("ckpt", ckpt)):
        block = m.student.backbone.blocks[0]

        def counted(*args, n=name, forward=block.forward):
            calls[n] += 1
            return forward(*args)

        block.forward = counted  # (module hooks do not see the recomputation)
    outs = []
    for m in (plain, ckpt):
        torch.manual_seed(7)  # the drop-path draws of the step
        outs.append(train_step(m, random_views(), values()))
    assert calls["ckpt"] == 2 * calls["plain"] > 0  # forward, then again in backward
    assert outs[1]["loss"] == pytest.approx(outs[0]["loss"], abs=1e-6)
    a, b = params(plain.student), params(ckpt.student)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_warmups_longer_than_the_run_are_shortened_with_one_warning(caplog) -> None:
    """A quick ``--epochs 1`` trial of the recipe (10 warm-up epochs, 1 frozen) runs: the
    warm-ups are cut to the run, and one warning names the new values."""
    cfg = load_config("default", {"epochs": 1, "warmup_teacher_temp_epochs": 30})
    with caplog.at_level(logging.WARNING, logger="dino"):
        short = shorten_warmups(cfg)
    assert short.optim.warmup_epochs == 1 and short.loss.warmup_teacher_temp_epochs == 1
    assert short.optim.freeze_last_layer == 1  # not longer than the run: kept
    assert cfg.optim.warmup_epochs == 10  # the given config is left as it is
    (record,) = caplog.records
    assert (
        "--warmup-epochs 10" in record.message
        and "--warmup-teacher-temp-epochs 30" in record.message
    )
    assert "1 epochs" in record.message
    fits = load_config("default", {"epochs": 20})
    assert shorten_warmups(fits) is fits


def test_a_step_leaves_the_given_batch_as_it_is() -> None:
    m = tiny_learner(accumulate=2)
    views = random_views()
    kept = copy.deepcopy(views)
    train_step(m, views, values())
    assert all(torch.equal(a, b) for a, b in zip(views, kept, strict=True))
