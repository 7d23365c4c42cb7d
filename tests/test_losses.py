import numpy as np
import pytest
import torch

from logitcache.student.losses import hint_loss, kd_loss, masked_ce, scheduled


def _softmax64(x, t):
    z = x / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _kd_reference(s, t, temp):
    p_t, p_s = _softmax64(t, temp), _softmax64(s, temp)
    return (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1).mean() * temp**2


@pytest.mark.parametrize("temp", [1.0, 4.0, 8.0])
def test_kd_loss_matches_float64_reference_with_t_squared(temp):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(16, 10)) * 3, rng.normal(size=(16, 10)) * 3
    got = kd_loss(torch.tensor(s, dtype=torch.float32), [torch.tensor(t, dtype=torch.float32)], temp).item()
    assert got == pytest.approx(_kd_reference(s, t, temp), rel=1e-4)


def test_kd_is_zero_when_student_equals_teacher():
    x = torch.randn(8, 10)
    assert kd_loss(x, [x.clone()], 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_several_teachers_average_probs_or_kl():
    rng = np.random.default_rng(1)
    s, t1, t2 = (rng.normal(size=(8, 5)) for _ in range(3))
    ts = [torch.tensor(t1, dtype=torch.float32), torch.tensor(t2, dtype=torch.float32)]
    st = torch.tensor(s, dtype=torch.float32)
    by_kl = kd_loss(st, ts, 2.0, "kl").item()
    assert by_kl == pytest.approx((_kd_reference(s, t1, 2.0) + _kd_reference(s, t2, 2.0)) / 2, rel=1e-4)
    p = (_softmax64(t1, 2.0) + _softmax64(t2, 2.0)) / 2
    ref = (p * (np.log(p) - np.log(_softmax64(s, 2.0)))).sum(1).mean() * 4
    assert kd_loss(st, ts, 2.0, "probs").item() == pytest.approx(ref, rel=1e-4)


def test_masked_ce_uses_labeled_rows_only():
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    mask = torch.tensor([True, False, True, False, False, False])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert masked_ce(logits, labels, mask).item() == pytest.approx(expected.item())
    none = masked_ce(logits.requires_grad_(), labels, torch.zeros(6, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad


def test_hint_losses():
    a = torch.randn(4, 8, 2, 2)
    assert hint_loss(a, a, "mse").item() == 0.0
    assert hint_loss(a, 3 * a, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert hint_loss(a, 3 * a, "normalized_mse").item() == pytest.approx(0.0, abs=1e-6)
    assert hint_loss(a, -a, "cosine").item() == pytest.approx(2.0)
    ref = ((a - 2 * a) ** 2).mean().item()
    assert hint_loss(a, 2 * a, "mse").item() == pytest.approx(ref)


def test_schedules():
    assert scheduled("constant", 4, 1, 0.7) == 4
    assert scheduled("linear", 4, 2, 0.5) == 3
    assert scheduled("cosine", 4, 2, 0.0) == 4 and scheduled("cosine", 4, 2, 1.0) == pytest.approx(2)
    assert scheduled("cosine", 4, 2, 0.5) == pytest.approx(3)
    assert scheduled("step", 4, 2, 0.49) == 4 and scheduled("step", 4, 2, 0.5) == 2
