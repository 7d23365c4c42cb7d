"""DKD against a float64 reference written from the paper's decomposition."""

import numpy as np
import pytest
import torch

from logitcache.core.schedule import Progress
from logitcache.student.methods import (
    Batch,
    Context,
    StudentOut,
    TeacherOut,
    methods,
    parse_loss,
)


def _softmax64(x, t):
    z = x / t - (x / t).max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _dkd_reference(s, p_t, target, temp, alpha, beta):
    """TCKD: KL of the binary (target, rest) distributions; NCKD: KL of the renormalised non-target ones."""
    p_s = _softmax64(s, temp)
    tckd = nckd = 0.0
    for i, g in enumerate(target):
        bt, bs = np.array([p_t[i, g], 1 - p_t[i, g]]), np.array([p_s[i, g], 1 - p_s[i, g]])
        tckd += (bt * np.log(bt / bs)).sum()
        rest = np.arange(s.shape[1]) != g
        qt, qs = p_t[i, rest] / (1 - p_t[i, g]), p_s[i, rest] / (1 - p_s[i, g])
        nckd += (qt * np.log(qt / qs)).sum()
    n = len(target)
    return alpha * tckd / n * temp**2 + beta * nckd / n * temp**2, tckd / n * temp**2, nckd / n * temp**2


def _dkd(**settings):
    cfg = parse_loss({"dkd": settings}, "students.s")["dkd"]
    return methods()["dkd"](cfg, Context(num_classes=6, num_samples=100, student_shapes={}, teacher_shapes={}))


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dkd_matches_float64_decomposition_with_labels_and_teacher_argmax(temp):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(8, 6)) * 2, rng.normal(size=(8, 6)) * 2
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 1])
    labeled = np.array([1, 1, 0, 1, 0, 0, 1, 0], dtype=float)
    p_t = _softmax64(t, temp)
    target = np.where(labeled > 0, labels, p_t.argmax(1))  # unlabeled rows: the teacher's class
    expected, tckd, nckd = _dkd_reference(s, p_t, target, temp, alpha=0.5, beta=8.0)
    method = _dkd(alpha=0.5, temperature=temp, warmup=0)
    batch = Batch(torch.tensor(labels), torch.tensor(labeled), torch.arange(8))
    loss, terms = method(StudentOut(torch.tensor(s, dtype=torch.float32), {}),
                         TeacherOut([torch.tensor(t, dtype=torch.float32)], {}), batch, Progress(0.0, 0.0))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert terms["tckd"].item() == pytest.approx(tckd, rel=1e-4) and terms["nckd"].item() == pytest.approx(nckd, rel=1e-4)


def test_dkd_averages_teachers_probabilities_and_warms_up_linearly():
    rng = np.random.default_rng(1)
    s, t1, t2 = (rng.normal(size=(5, 6)) * 2 for _ in range(3))
    labels = np.array([0, 1, 2, 3, 4])
    p_t = (_softmax64(t1, 4.0) + _softmax64(t2, 4.0)) / 2
    full, _, _ = _dkd_reference(s, p_t, labels, 4.0, alpha=1.0, beta=8.0)
    method = _dkd(warmup=20)
    student = StudentOut(torch.tensor(s, dtype=torch.float32, requires_grad=True), {})
    teacher = TeacherOut([torch.tensor(t1, dtype=torch.float32), torch.tensor(t2, dtype=torch.float32)], {})
    batch = Batch(torch.tensor(labels), torch.ones(5), torch.arange(5))
    for epoch, factor in [(0.0, 0.0), (5.0, 0.25), (20.0, 1.0), (30.0, 1.0)]:
        loss, terms = method(student, teacher, batch, Progress(0.5, epoch))
        assert loss.item() == pytest.approx(factor * full, rel=1e-4, abs=1e-9) and terms["warmup"] == factor
    loss.backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
