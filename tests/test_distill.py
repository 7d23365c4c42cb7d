import pytest
import torch

from logitcache.student.methods import Adapter


@pytest.mark.parametrize("student, teacher", [
    ((8, 7, 7), (16, 4, 4)),   # maps, student larger: conv + pool
    ((8, 2, 2), (16, 4, 4)),   # maps, student smaller: conv + interpolate
    ((8, 4, 4), (16, 4, 4)),   # same size: conv only
    ((32,), (64,)),            # vectors: linear
    ((8, 7, 7), (64,)),        # map to vector: pool + linear
    ((32,), (16, 2, 2)),       # vector to map: linear + reshape
])
def test_adapter_maps_student_shape_to_teacher_shape(student, teacher):
    adapter = Adapter(student, teacher)
    out = adapter(torch.randn(3, *student))
    assert out.shape == (3, *teacher)
    out.sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())
