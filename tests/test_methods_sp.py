"""SP against a float64 reference written from the paper's similarity matrices."""

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


def _sp64(fs, ft):
    """The paper's loss, with the student side in the teacher's form: a map, or its spatial mean for an embedding."""
    b = len(fs)
    if ft.ndim == 2:
        fs = fs.mean(axis=(2, 3))
    gs, gt = fs.reshape(b, -1) @ fs.reshape(b, -1).T, ft.reshape(b, -1) @ ft.reshape(b, -1).T
    gs, gt = gs / np.linalg.norm(gs, axis=1, keepdims=True), gt / np.linalg.norm(gt, axis=1, keepdims=True)
    return ((gt - gs) ** 2).sum() / b**2


@pytest.mark.parametrize("form, teacher_shape", [("map", (6, 2, 2)), ("embedding", (6,))])
def test_sp_matches_float64_gram_formula_and_reaches_the_student(form, teacher_shape):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 3, 4, 4)), rng.normal(size=(5, *teacher_shape))
    key = TeacherInput("layer3", form)
    cfg = parse_loss({"sp": {"pairs": [["block3", "layer3"]], "form": form}}, "students.s")["sp"]
    method = methods()["sp"](cfg, Context(10, 100, {"block3": (3, 4, 4)}, {key: teacher_shape}))
    student = StudentOut(torch.zeros(5, 10), {"block3": torch.tensor(s, dtype=torch.float32, requires_grad=True)})
    loss, terms = method(student, TeacherOut([], {key: torch.tensor(t, dtype=torch.float32)}),
                         Batch(torch.zeros(5, dtype=torch.long), torch.zeros(5), torch.arange(5)), Progress(0, 0))
    assert loss.item() == pytest.approx(_sp64(s, t), rel=1e-4) and terms["sp"].item() == loss.item()
    loss.backward()
    assert student.features["block3"].grad.abs().sum() > 0
