"""CRD's NCE loss against a float64 formula on a fixed bank with fixed negatives; its memories."""

import numpy as np
import pytest
import torch

from logitcache.core.schedule import Progress
from logitcache.student.methods import (
    Batch,
    Context,
    StudentOut,
    TeacherInput,
    TeacherOut,
    methods,
    parse_loss,
)

KEY = TeacherInput("layer3", "embedding")
N, TAU, M = 20, 0.07, 0.5


def _crd(cached=None, **settings):
    cfg = parse_loss({"crd": {"student": "block3", "teacher": "layer3", "feat_dim": 4, "negatives": 5, **settings}},
                     "students.s")["crd"]
    banks = {KEY: cached} if cached is not None else {}
    return methods()["crd"](cfg, Context(10, N, {"block3": (3, 2, 2)}, {KEY: (6,)}, banks))


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _head64(head, x):
    return _unit(x @ head.linear.weight.double().detach().numpy().T + head.linear.bias.double().detach().numpy())


def _nce64(anchor, entries, rows, negatives, z=None):
    """exp(<anchor, entry> / tau) / Z, positive first; -[log D1(pos) + sum log D0(neg)] averaged over anchors."""
    idx = np.concatenate([rows[:, None], np.broadcast_to(negatives, (len(rows), len(negatives)))], axis=1)
    scores = np.exp(np.einsum("bd,bkd->bk", anchor, entries[idx]) / TAU)
    z = scores.mean() * N if z is None else z
    p, noise = scores / z, len(negatives) / N
    loss = -(np.log(p[:, 0] / (p[:, 0] + noise)).sum() + np.log(noise / (p[:, 1:] + noise)).sum()) / len(rows)
    return loss, z


def test_crd_nce_matches_float64_in_both_directions_and_updates_only_the_student_memory():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(N, 6))
    torch.manual_seed(0)
    method = _crd(torch.tensor(bank, dtype=torch.float32))
    fixed = torch.tensor([1, 4, 9, 9, 17])
    method.draw_negatives = lambda rows: fixed  # injected negatives
    rows = np.array([2, 5, 11])
    s, t = rng.normal(size=(3, 3, 2, 2)), rng.normal(size=(3, 6))
    memory = method.student_memory.double().numpy().copy()
    f_s = _head64(method.student_head, s.mean(axis=(2, 3)))
    f_t = _head64(method.teacher_head, t)
    teacher_bank = _head64(method.teacher_head, bank)  # the exact bank through the current teacher head
    loss_s, z_s = _nce64(f_s, teacher_bank, rows, fixed.numpy())
    loss_t, z_t = _nce64(f_t, memory, rows, fixed.numpy())

    student = StudentOut(torch.zeros(3, 10), {"block3": torch.tensor(s, dtype=torch.float32, requires_grad=True)})
    batch = Batch(torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.tensor(rows))
    loss, terms = method(student, TeacherOut([], {KEY: torch.tensor(t, dtype=torch.float32)}), batch, Progress(0, 0))
    assert terms["student_anchor"].item() == pytest.approx(loss_s, rel=1e-4)
    assert terms["teacher_anchor"].item() == pytest.approx(loss_t, rel=1e-4)
    assert loss.item() == pytest.approx(loss_s + loss_t, rel=1e-4)
    assert method.normalisers.double().numpy() == pytest.approx([z_s, z_t], rel=1e-4)

    updated = memory.copy()
    updated[rows] = _unit(M * memory[rows] + (1 - M) * f_s)
    assert np.allclose(method.student_memory.double().numpy(), updated, atol=1e-6)
    assert torch.equal(method.teacher_bank, torch.tensor(bank, dtype=torch.float32))  # exact: never updated
    loss.backward()
    assert student.features["block3"].grad.abs().sum() > 0
    assert method.student_head.linear.weight.grad.abs().sum() > 0 and method.teacher_head.linear.weight.grad.abs().sum() > 0

    # a later batch keeps the first batch's Z and contrasts with the updated student memory
    t2 = rng.normal(size=(3, 6))
    rows2 = np.array([0, 2, 3])
    expected, _ = _nce64(_head64(method.teacher_head, t2), updated, rows2, fixed.numpy(), z=z_t)
    _, terms = method(StudentOut(torch.zeros(3, 10), {"block3": torch.tensor(s, dtype=torch.float32)}),
                      TeacherOut([], {KEY: torch.tensor(t2, dtype=torch.float32)}),
                      Batch(torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.tensor(rows2)), Progress(0, 0))
    assert terms["teacher_anchor"].item() == pytest.approx(expected, rel=1e-4)


def test_negatives_are_seeded_by_torch_and_exclude_the_batch():
    method = _crd(torch.zeros(N, 6), negatives=200)
    rows = torch.tensor([0, 3, 7, 19])
    torch.manual_seed(5)
    first = method.draw_negatives(rows)
    torch.manual_seed(5)
    assert torch.equal(first, method.draw_negatives(rows)) and len(first) == 200
    assert not set(first.tolist()) & set(rows.tolist()) and set(first.tolist()) == set(range(N)) - set(rows.tolist())


def test_negatives_come_from_the_training_rows_alone_and_the_noise_counts_only_them():
    cfg = parse_loss({"crd": {"student": "block3", "teacher": "layer3", "feat_dim": 4, "negatives": 300}},
                     "students.s")["crd"]
    held_out = {1, 4, 11, 12}  # validation rows: never a negative
    train_rows = torch.tensor(sorted(set(range(N)) - held_out))
    method = methods()["crd"](cfg, Context(10, N, {"block3": (3, 2, 2)}, {KEY: (6,)}, {KEY: torch.zeros(N, 6)},
                                           train_rows=train_rows))
    rows = torch.tensor([0, 3])
    drawn = set(method.draw_negatives(rows).tolist())
    assert drawn == set(range(N)) - held_out - {0, 3}
    assert method.num_data == N - 4


def test_momentum_bank_updates_the_teacher_memory_and_memories_are_saved():
    torch.manual_seed(0)
    method = _crd(bank="momentum")
    assert methods()["crd"].needs(method.cfg).banks == []
    before = method.teacher_memory.clone()
    rows = torch.tensor([1, 2])
    t = torch.randn(2, 6)
    method(StudentOut(torch.zeros(2, 10), {"block3": torch.randn(2, 3, 2, 2)}), TeacherOut([], {KEY: t}),
           Batch(torch.zeros(2, dtype=torch.long), torch.zeros(2), rows), Progress(0, 0))
    f_t = _head64(method.teacher_head, t.double().numpy())
    expected = _unit(M * before[rows].double().numpy() + (1 - M) * f_t)
    assert np.allclose(method.teacher_memory[rows].double().numpy(), expected, atol=1e-6)
    assert torch.equal(method.teacher_memory[3:], before[3:])
    assert {"student_memory", "teacher_memory", "normalisers"} <= set(method.state_dict())
    assert "teacher_bank" not in set(_crd(torch.zeros(N, 6)).state_dict())  # exact: read from the cache each start
