"""AT against a float64 reference written from the paper's attention maps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitcache.core.errors import LogitcacheError
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


def _attention64(f, p=2.0):
    a = (np.abs(f) ** p).mean(axis=1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _at(pairs, student_shapes, teacher_shapes, **settings):
    cfg = parse_loss({"at": {"pairs": pairs, **settings}}, "students.s")["at"]
    ctx = Context(num_classes=10, num_samples=100, student_shapes=student_shapes, teacher_shapes=teacher_shapes)
    return methods()["at"](cfg, ctx)


def test_at_sums_over_pairs_the_mean_squared_difference_of_attention_maps():
    rng = np.random.default_rng(0)
    s2, s3 = rng.normal(size=(4, 3, 8, 8)), rng.normal(size=(4, 5, 4, 4))
    t2, t3 = rng.normal(size=(4, 6, 4, 4)), rng.normal(size=(4, 7, 4, 4))
    k2, k3 = TeacherInput("layer2", "attention"), TeacherInput("layer3", "attention")
    method = _at([["block2", "layer2"], ["block3", "layer3"]], {"block2": (3, 8, 8), "block3": (5, 4, 4)},
                 {k2: (16,), k3: (16,)}, p=3.0)
    pooled = s2.reshape(4, 3, 4, 2, 4, 2).mean(axis=(3, 5))  # the larger student map, average-pooled 2x2
    first = ((_attention64(pooled, 3.0) - _attention64(t2, 3.0)) ** 2).mean()
    second = ((_attention64(s3, 3.0) - _attention64(t3, 3.0)) ** 2).mean()
    student = StudentOut(torch.zeros(4, 10), {"block2": torch.tensor(s2, dtype=torch.float32, requires_grad=True),
                                              "block3": torch.tensor(s3, dtype=torch.float32, requires_grad=True)})
    teacher = TeacherOut([], {k2: torch.tensor(_attention64(t2, 3.0), dtype=torch.float16),
                              k3: torch.tensor(_attention64(t3, 3.0), dtype=torch.float16)})
    loss, terms = method(student, teacher, Batch(torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.arange(4)),
                         Progress(0, 0))
    assert terms["block2->layer2"].item() == pytest.approx(first, rel=2e-3)  # the teacher side is float16, as cached
    assert loss.item() == pytest.approx(first + second, rel=2e-3)
    loss.backward()
    assert all(student.features[n].grad.abs().sum() > 0 for n in ("block2", "block3"))


def test_a_smaller_student_map_is_interpolated_up_to_the_teacher_size():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(3, 4, 2, 2)), rng.normal(size=(3, 6, 4, 4))
    key = TeacherInput("layer1", "attention")
    method = _at([["block1", "layer1"]], {"block1": (4, 2, 2)}, {key: (16,)})
    up = F.interpolate(torch.tensor(s), size=(4, 4), mode="bilinear", align_corners=False).numpy()
    expected = ((_attention64(up) - _attention64(t)) ** 2).mean()
    loss, _ = method(StudentOut(torch.zeros(3, 10), {"block1": torch.tensor(s, dtype=torch.float32)}),
                     TeacherOut([], {key: torch.tensor(_attention64(t), dtype=torch.float32)}),
                     Batch(torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.arange(3)), Progress(0, 0))
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_at_refuses_a_vector_student_node():
    with pytest.raises(LogitcacheError, match="not a feature map"):
        _at([["flatten", "layer2"]], {"flatten": (64,)}, {TeacherInput("layer2", "attention"): (16,)})
