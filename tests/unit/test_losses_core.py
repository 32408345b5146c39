"""KD losses against naive per-frame references; masks, batch consistency, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from speech_kd.kd.losses import (
    blank_frame_weights,
    collapse_greedy,
    kd_ce_hard,
    kd_ctc_collapsed,
    kd_kl,
    kd_loss,
    kd_mse,
    topk_restrict,
)

B, T, V = 3, 7, 5


@pytest.fixture()
def tensors():
    gen = torch.Generator().manual_seed(0)
    student = torch.log_softmax(torch.randn(B, T, V, generator=gen), -1).requires_grad_()
    teacher = torch.log_softmax(3 * torch.randn(B, T, V, generator=gen), -1).requires_grad_()
    lengths = torch.tensor([7, 5, 2])
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return student, teacher, mask, lengths


def _naive_kl(student, teacher, mask, temp, weights=None):
    num = den = 0.0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            p = torch.softmax(teacher[b, t] / temp, -1)
            q = torch.log_softmax(student[b, t] / temp, -1)
            w = 1.0 if weights is None else float(weights[b, t])
            num += w * float(sum(p[v] * (math.log(p[v]) - q[v]) for v in range(V) if p[v] > 0))
            den += w
    return temp**2 * num / den


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kl_matches_naive_reference(tensors, temp):
    student, teacher, mask, _ = tensors
    got = kd_kl(student, teacher, mask, temp)
    assert float(got) == pytest.approx(_naive_kl(student.detach(), teacher.detach(), mask, temp), rel=1e-4)


def test_kl_with_frame_weights_and_topk(tensors):
    student, teacher, mask, _ = tensors
    weights = blank_frame_weights(teacher, 0, "downweight", 0.3, 0.1)
    got = kd_kl(student, teacher, mask, 2.0, weights)
    assert float(got) == pytest.approx(_naive_kl(student.detach(), teacher.detach(), mask, 2.0, weights), rel=1e-4)
    assert torch.equal(topk_restrict(teacher, V), teacher)
    restricted = kd_kl(student, topk_restrict(teacher, 2), mask, 2.0)
    assert torch.isfinite(restricted)


def test_padding_does_not_change_losses(tensors):
    student, teacher, mask, lengths = tensors
    noisy_s = torch.where(mask.unsqueeze(-1), student, torch.log_softmax(torch.randn(B, T, V), -1))
    noisy_t = torch.where(mask.unsqueeze(-1), teacher, torch.log_softmax(torch.randn(B, T, V), -1))
    for name in ("kl", "ce", "mse", "ctc"):
        a = kd_loss(name, student, teacher, mask, temperature=2.0, student_lengths=lengths, teacher_lengths=lengths)
        b = kd_loss(name, noisy_s, noisy_t, mask, temperature=2.0, student_lengths=lengths, teacher_lengths=lengths)
        assert float(a) == pytest.approx(float(b), rel=1e-5), name


def test_batch_equals_frame_weighted_singles(tensors):
    student, teacher, mask, lengths = tensors
    batch = kd_kl(student, teacher, mask, 2.0)
    singles = [
        kd_kl(
            student[b : b + 1, : lengths[b]],
            teacher[b : b + 1, : lengths[b]],
            torch.ones(1, int(lengths[b]), dtype=torch.bool),
            2.0,
        )
        for b in range(B)
    ]
    expected = sum(float(s) * int(n) for s, n in zip(singles, lengths)) / int(lengths.sum())
    assert float(batch) == pytest.approx(expected, rel=1e-5)


def test_no_gradient_reaches_the_teacher(tensors):
    student, teacher, mask, lengths = tensors
    for name in ("kl", "ce", "mse", "ctc"):
        student.grad = None
        kd_loss(name, student, teacher, mask, temperature=2.0, student_lengths=lengths).backward()
        assert teacher.grad is None, name
        assert student.grad is not None and student.grad.abs().sum() > 0, name


def test_ce_and_mse_references(tensors):
    student, teacher, mask, _ = tensors
    target = teacher.argmax(-1)
    ce = [-float(student[b, t, target[b, t]]) for b in range(B) for t in range(T) if mask[b, t]]
    assert float(kd_ce_hard(student, teacher, mask)) == pytest.approx(sum(ce) / len(ce), rel=1e-5)
    mse = [float(((student[b, t] - teacher[b, t]) ** 2).mean()) for b in range(B) for t in range(T) if mask[b, t]]
    assert float(kd_mse(student, teacher, mask)) == pytest.approx(sum(mse) / len(mse), rel=1e-5)


def test_ctc_on_collapsed_teacher_path():
    path = torch.tensor([[0, 3, 3, 0, 3, 2, 2, 0], [1, 1, 0, 0, 0, 0, 4, 4]])
    teacher = torch.nn.functional.one_hot(path, V).float().clamp(min=1e-6).log()
    labels, lens = collapse_greedy(teacher, torch.tensor([8, 3]), 0)
    assert labels[0].tolist() == [3, 3, 2] and lens.tolist() == [3, 1] and labels[1, 0] == 1
    student = teacher.clone()  # a student that already matches the teacher has a low CTC loss
    low = kd_ctc_collapsed(student, teacher, torch.tensor([8, 3]), torch.tensor([8, 3]), 0)
    high = kd_ctc_collapsed(
        torch.log_softmax(torch.zeros(2, 8, V), -1), teacher, torch.tensor([8, 3]), torch.tensor([8, 3]), 0
    )
    assert float(low) < 0.01 < float(high)


def test_blank_modes():
    teacher = torch.log(torch.tensor([[[0.95, 0.05], [0.5, 0.5]]]))
    assert blank_frame_weights(teacher, 0, "none").tolist() == [[1.0, 1.0]]
    assert blank_frame_weights(teacher, 0, "drop", 0.9).tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="blank_mode"):
        blank_frame_weights(teacher, 0, "sometimes")
    with pytest.raises(ValueError, match="unknown kd_loss"):
        kd_loss("js", teacher, teacher, torch.ones(1, 2, dtype=torch.bool))
