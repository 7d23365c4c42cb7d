"""RKD and PKT against float64 references written from their papers, on pooled embeddings."""

import itertools

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


def _huber(x):
    return np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5)


def _rkd64(s, t):
    """Distance: pairwise distances over their mean (i != j); angle: cos of the angle at e_i between e_j and e_k."""
    b = len(s)

    def distances(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(b)] for i in range(b)])
        return d / d[~np.eye(b, dtype=bool)].mean()

    def cosines(e):
        c = np.zeros((b, b, b))
        for i, j, k in itertools.product(range(b), repeat=3):
            u, v = e[j] - e[i], e[k] - e[i]
            if j != i and k != i:
                c[i, j, k] = u @ v / np.linalg.norm(u) / np.linalg.norm(v)
        return c
    return _huber(distances(s) - distances(t)).mean(), _huber(cosines(s) - cosines(t)).mean()


def _pkt64(s, t):
    def probs(e):
        u = e / np.linalg.norm(e, axis=1, keepdims=True)
        k = (u @ u.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)
    ps, pt = probs(s), probs(t)
    return (pt * np.log(pt / ps)).mean()


def _run(name, s, t, **settings):
    key = TeacherInput("layer3", "embedding")
    cfg = parse_loss({name: {"student": "block3", "teacher": "layer3", **settings}}, "students.s")[name]
    method = methods()[name](cfg, Context(10, 100, {"block3": s.shape[1:]}, {key: t.shape[1:]}))
    student = StudentOut(torch.zeros(len(s), 10), {"block3": torch.tensor(s, dtype=torch.float32, requires_grad=True)})
    loss, terms = method(student, TeacherOut([], {key: torch.tensor(t, dtype=torch.float32)}),
                         Batch(torch.zeros(len(s), dtype=torch.long), torch.zeros(len(s)), torch.arange(len(s))),
                         Progress(0, 0))
    loss.backward()
    assert student.features["block3"].grad.abs().sum() > 0  # the gradient reaches the student
    return loss.item(), terms


def test_rkd_distance_and_angle_terms_match_float64_on_pooled_maps():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 4, 3, 3)), rng.normal(size=(6, 8)) * 3
    distance, angle = _rkd64(s.mean(axis=(2, 3)), t)  # the student's map pooled to its embedding
    loss, terms = _run("rkd", s, t, distance_weight=2.0, angle_weight=3.0)
    assert terms["distance"].item() == pytest.approx(distance, rel=1e-4)
    assert terms["angle"].item() == pytest.approx(angle, rel=1e-4)
    assert loss == pytest.approx(2 * distance + 3 * angle, rel=1e-4)


def test_pkt_matches_float64_kernel_kl_on_vectors():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(7, 5)), rng.normal(size=(7, 9))
    loss, terms = _run("pkt", s, t)
    assert loss == pytest.approx(_pkt64(s, t), rel=1e-4) and terms["pkt"].item() == loss
