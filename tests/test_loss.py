"""DINOLoss against the definition of docs/recipe.md ("Loss, centering and sharpening")."""

from __future__ import annotations

import math

import pytest
import torch

from dino.loss import DINOLoss

K, B = 3, 2


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def reference_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    n_global: int,
    tau_s: float,
    tau_t: float,
    include_same: bool = False,
) -> float:
    """Explicit loops: mean over pairs (i teacher global, v student view, v != i) of the batch
    mean of -sum_k Pt_i[k] log Ps_v[k]."""
    batch = teacher.shape[0] // n_global
    n_views = student.shape[0] // batch
    c = center.flatten().tolist()
    pair_losses = []
    for i in range(n_global):
        for v in range(n_views):
            if v == i and not include_same:
                continue
            total = 0.0
            for b in range(batch):
                t_row = teacher[i * batch + b].tolist()
                s_row = student[v * batch + b].tolist()
                pt = softmax([(t_row[k] - c[k]) / tau_t for k in range(len(c))])
                ps = softmax([x / tau_s for x in s_row])
                total += -sum(pt[k] * math.log(ps[k]) for k in range(len(c)))
            pair_losses.append(total / batch)
    return sum(pair_losses) / len(pair_losses)


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


# Hand-chosen logits: 2 global + 1 local view, batch 2, K = 3 (rows are view-major).
STUDENT = torch.tensor(
    [
        [0.30, -0.20, 0.10],  # view 0 (global 1), sample 0
        [-0.10, 0.40, 0.00],  # view 0, sample 1
        [0.05, 0.15, -0.25],  # view 1 (global 2), sample 0
        [0.20, 0.20, -0.30],  # view 1, sample 1
        [-0.35, 0.10, 0.25],  # view 2 (local), sample 0
        [0.00, -0.15, 0.30],  # view 2, sample 1
    ]
)
TEACHER = torch.tensor(
    [
        [0.10, 0.05, -0.02],  # teacher view 0, sample 0
        [-0.04, 0.08, 0.01],  # teacher view 0, sample 1
        [0.03, -0.06, 0.09],  # teacher view 1, sample 0
        [0.07, 0.02, -0.05],  # teacher view 1, sample 1
    ]
)


def test_loss_equals_explicit_pair_loop_with_center() -> None:
    tau_s, tau_t = 0.1, 0.07
    loss_fn = DINOLoss(K, n_global=2, student_temp=tau_s, center_momentum=0.9)
    c0 = torch.tensor([[0.02, -0.01, 0.03]])
    loss_fn.center.copy_(c0)
    loss, _ = loss_fn(STUDENT.clone(), TEACHER.clone(), tau_t)
    expected = reference_loss(STUDENT, TEACHER, c0, 2, tau_s, tau_t)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # The same input with the same-view pairs counted gives another value: the test discriminates.
    with_same = reference_loss(STUDENT, TEACHER, c0, 2, tau_s, tau_t, include_same=True)
    assert abs(with_same - expected) > 1e-3


@pytest.mark.parametrize("n_local", [0, 1, 4])
def test_loss_matches_loop_for_any_number_of_local_views(n_local: int) -> None:
    g = torch.Generator().manual_seed(n_local)
    n_views = 2 + n_local
    student = torch.randn(n_views * B, K, generator=g)
    teacher = torch.randn(2 * B, K, generator=g)
    loss_fn = DINOLoss(K, n_global=2, student_temp=0.1)
    loss, _ = loss_fn(student, teacher, 0.04)
    expected = reference_loss(student, teacher, torch.zeros(1, K), 2, 0.1, 0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_pair_count_is_2v_minus_2() -> None:
    """All student views identical: the loss is the mean over the 2V-2 pairs of identical
    per-teacher cross-entropies, i.e. the plain mean of the two teachers' cross-entropies."""
    n_views = 5
    s_row = torch.tensor([[0.2, -0.1, 0.05]])
    student = s_row.repeat(n_views * B, 1)
    teacher = torch.tensor([[0.5, 0.0, 0.0]] * B + [[0.0, 0.0, 0.5]] * B)
    tau_s, tau_t = 0.1, 0.5
    loss, _ = DINOLoss(K, student_temp=tau_s)(student, teacher, tau_t)
    ps = softmax([x / tau_s for x in s_row[0].tolist()])
    ce = [
        -sum(p * math.log(q) for p, q in zip(softmax([x / tau_t for x in t]), ps, strict=True))
        for t in ([0.5, 0.0, 0.0], [0.0, 0.0, 0.5])
    ]
    # (V-1) pairs per teacher view, divided by 2V-2 pairs.
    expected = ((n_views - 1) * ce[0] + (n_views - 1) * ce[1]) / (2 * n_views - 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_same_view_pairs_are_skipped() -> None:
    """Student global view 0 is paired with teacher view 1 only: its gradient must not depend on
    teacher view 0, while a local view's gradient does."""

    def grads(teacher: torch.Tensor) -> torch.Tensor:
        student = STUDENT.clone().requires_grad_(True)
        loss, _ = DINOLoss(K)(student, teacher, 0.07)
        loss.backward()
        return student.grad

    changed = TEACHER.clone()
    changed[:B] = torch.tensor([[1.0, -2.0, 0.5], [-0.7, 0.3, 1.2]])  # teacher view 0 only
    g1, g2 = grads(TEACHER.clone()), grads(changed)
    torch.testing.assert_close(g1[:B], g2[:B])  # student view 0: unchanged
    assert not torch.allclose(g1[B : 2 * B], g2[B : 2 * B])  # student view 1 sees teacher 0
    assert not torch.allclose(g1[2 * B :], g2[2 * B :])  # the local view sees teacher 0


def test_same_view_pair_value_does_not_enter_the_loss() -> None:
    """Student view i equal to a perfect copy of teacher view i lowers (i, i) only: the loss must
    equal the loop without (i, i)."""
    tau_s, tau_t = 0.1, 0.1
    student = STUDENT.clone()
    student[:B] = TEACHER[:B] * 50  # view 0 of the student now predicts teacher view 0 sharply
    loss, _ = DINOLoss(K, student_temp=tau_s)(student, TEACHER.clone(), tau_t)
    assert loss.item() == pytest.approx(
        reference_loss(student, TEACHER, torch.zeros(1, K), 2, tau_s, tau_t), rel=1e-5
    )


def test_center_update_once() -> None:
    m = 0.9
    loss_fn = DINOLoss(K, center_momentum=m)
    c0 = torch.tensor([[0.1, -0.2, 0.3]])
    loss_fn.center.copy_(c0)
    loss_fn(STUDENT.clone(), TEACHER.clone(), 0.04)
    expected = m * c0 + (1 - m) * TEACHER.mean(0, keepdim=True)
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center, expected)
    loss_fn.apply_center_update()  # a second call must not apply it again
    torch.testing.assert_close(loss_fn.center, expected)


def test_center_uses_both_global_views() -> None:
    """The mean is over the teacher outputs of both global views (all 2B rows)."""
    loss_fn = DINOLoss(K, center_momentum=0.5)
    teacher = torch.zeros(2 * B, K)
    teacher[B:] = 4.0  # only view 1 is nonzero: its mean over both views is 2
    loss_fn(torch.zeros(3 * B, K), teacher, 0.04)
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center, torch.full((1, K), 1.0))  # 0.5 * 0 + 0.5 * 2


def test_center_pending_update_is_applied_once_across_steps() -> None:
    """forward -> apply -> forward: the second forward uses c1 and applies nothing twice."""
    m = 0.9
    loss_fn = DINOLoss(K, center_momentum=m)
    t1 = TEACHER.clone()
    t2 = TEACHER.flip(0) * 2
    loss_fn(STUDENT.clone(), t1, 0.04)
    loss_fn.apply_center_update()
    c1 = (1 - m) * t1.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, c1)
    loss2, _ = loss_fn(STUDENT.clone(), t2, 0.04)
    torch.testing.assert_close(loss_fn.center, c1)  # t2's update is still pending
    assert loss2.item() == pytest.approx(reference_loss(STUDENT, t2, c1, 2, 0.1, 0.04), rel=1e-5)
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center, m * c1 + (1 - m) * t2.mean(0, keepdim=True))


def test_center_update_without_explicit_apply_happens_at_next_forward() -> None:
    m = 0.9
    loss_fn = DINOLoss(K, center_momentum=m)
    loss_fn(STUDENT.clone(), TEACHER.clone(), 0.04)
    torch.testing.assert_close(loss_fn.center, torch.zeros(1, K))  # not applied yet
    loss_fn(STUDENT.clone(), TEACHER.clone(), 0.04)  # applies the first step's update once
    torch.testing.assert_close(loss_fn.center, (1 - m) * TEACHER.mean(0, keepdim=True))


def test_stats_entropy_and_kl() -> None:
    tau_t = 0.07
    c0 = torch.tensor([[0.02, -0.01, 0.03]])
    loss_fn = DINOLoss(K)
    loss_fn.center.copy_(c0)
    loss, stats = loss_fn(STUDENT.clone(), TEACHER.clone(), tau_t)
    ents = [
        entropy(softmax([(t - c) / tau_t for t, c in zip(row, c0[0].tolist(), strict=True)]))
        for row in TEACHER.tolist()
    ]
    assert stats.teacher_entropy.item() == pytest.approx(sum(ents) / len(ents), rel=1e-5)
    assert stats.kl.item() == pytest.approx(loss.item() - stats.teacher_entropy.item(), abs=1e-6)
    assert stats.kl.item() > 0  # student and teacher disagree


def test_uniform_teacher_has_entropy_log_k() -> None:
    k = 7
    _, stats = DINOLoss(k)(torch.randn(4 * B, k), torch.zeros(2 * B, k), 0.04)
    assert stats.teacher_entropy.item() == pytest.approx(math.log(k), rel=1e-6)


def test_kl_is_zero_when_student_equals_teacher() -> None:
    """Same distribution for every view of student and teacher: cross-entropy = entropy."""
    tau_s, tau_t = 0.1, 0.04
    t_row = torch.tensor([[0.03, -0.02, 0.01]])
    teacher = t_row.repeat(2 * B, 1)
    student = (t_row / tau_t * tau_s).repeat(4 * B, 1)  # s / tau_s == t / tau_t
    loss, stats = DINOLoss(K, student_temp=tau_s)(student, teacher, tau_t)
    assert stats.kl.item() == pytest.approx(0.0, abs=1e-5)
    assert loss.item() == pytest.approx(stats.teacher_entropy.item(), rel=1e-5)


def test_loss_has_gradient_for_student_only() -> None:
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    loss, _ = DINOLoss(K)(student, teacher, 0.04)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher receives no gradient


@pytest.mark.parametrize("bounds", [[0, 2, 5], [0, 1, 5], [0, 3, 5], [0, 1, 2, 3, 4, 5]])
def test_student_terms_of_a_partition_add_up_to_the_loss(bounds: list[int]) -> None:
    """The training step backpropagates the views part by part (one resolution at a time): the
    parts' terms must sum to the loss, and their gradients to its gradient."""
    torch.manual_seed(0)
    n_views, k, b = 5, 7, 3
    student = torch.randn(n_views * b, k)
    teacher = torch.randn(2 * b, k)
    whole = student.clone().requires_grad_(True)
    loss, _ = DINOLoss(k)(whole, teacher, 0.04)
    loss.backward()
    loss_fn = DINOLoss(k)
    targets = loss_fn.targets(teacher, 0.04)
    parts = student.clone().requires_grad_(True)
    total = 0.0
    for first, end in zip(bounds, bounds[1:], strict=False):
        term = loss_fn.student_term(parts[first * b : end * b], targets, first, n_views)
        term.backward()
        total += term.item()
    assert total == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(parts.grad, whole.grad)
    assert targets.stats(torch.tensor(total)).kl.item() == pytest.approx(
        loss.item() - targets.entropy.item(), rel=1e-6
    )
