"""Distillation methods against float64 formulas written here from their papers, and the loss the learner sums."""

import json

import numpy as np
import pytest
import torch

from logitcache.core.config import validate
from logitcache.core.errors import LogitcacheError
from logitcache.core.schedule import Progress, Schedule, value_at
from logitcache.student.losses import masked_ce
from logitcache.student.methods import (
    Batch,
    Context,
    TeacherInput,
    TeacherOut,
    describe,
    methods,
    parse_loss,
)
from logitcache.student.methods.fitnets import Adapter, hint_distance
from logitcache.student.methods.kd import kd_loss
from logitcache.student.learner import Learner


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
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 4))
    labels = np.array([0, 1, 2, 3, 0, 1])
    mask = np.array([1, 0, 1, 0, 0, 0], dtype=float)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -(log_p[[0, 2], labels[[0, 2]]]).mean()
    got = masked_ce(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels), torch.tensor(mask))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    none = masked_ce(torch.randn(6, 4, requires_grad=True), torch.tensor(labels), torch.zeros(6))
    assert none.item() == 0.0 and none.requires_grad


def test_hint_distances_against_float64():
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(4, 8, 2, 2)), rng.normal(size=(4, 8, 2, 2))
    fs, ft = s.reshape(4, -1), t.reshape(4, -1)
    ts, tt = torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
    assert hint_distance(ts, tt, "mse").item() == pytest.approx(((fs - ft) ** 2).mean(), rel=1e-5)
    cos = (fs * ft).sum(1) / np.linalg.norm(fs, axis=1) / np.linalg.norm(ft, axis=1)
    assert hint_distance(ts, tt, "cosine").item() == pytest.approx((1 - cos).mean(), rel=1e-5)
    ns, nt = fs / np.linalg.norm(fs, axis=1, keepdims=True), ft / np.linalg.norm(ft, axis=1, keepdims=True)
    assert hint_distance(ts, tt, "normalized_mse").item() == pytest.approx(((ns - nt) ** 2).sum(1).mean(), rel=1e-5)


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


def test_schedules_including_step_decay_by_epochs():
    at = lambda fraction, epoch=0.0: Progress(fraction, epoch)  # noqa: E731
    assert value_at(4.0, at(0.7)) == 4.0
    assert value_at(Schedule(start=4, end=2, kind="linear"), at(0.5)) == 3
    cosine = Schedule(start=4, end=2, kind="cosine")
    assert value_at(cosine, at(0.0)) == 4 and value_at(cosine, at(1.0)) == pytest.approx(2)
    assert value_at(cosine, at(0.5)) == pytest.approx(3)
    halve = Schedule(start=8, kind="step", every=2, factor=0.5)  # halve T every 2 epochs
    assert [value_at(halve, at(0, e)) for e in (0, 1.99, 2, 3.5, 4, 6)] == [8, 8, 4, 4, 2, 1]
    stages = Schedule(start=1, end=0.25, kind="switch", at=0.2)  # 1 for the first 20 % of training, then 0.25
    assert [value_at(stages, at(f)) for f in (0, 0.1999, 0.2, 0.7, 1)] == [1, 1, 0.25, 0.25, 0.25]
    with pytest.raises(ValueError, match="switch schedule needs end"):
        Schedule(start=1, kind="switch")


class _Net(torch.nn.Module):
    """A student stand-in exposing 'logits' and one feature, as the feature extractor does."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        f = self.conv(x)
        return {"logits": self.fc(f.mean((2, 3))), "block2": f}


def test_learner_sums_ce_and_weighted_methods_computed_separately():
    torch.manual_seed(0)
    cfg = validate({"students": {"s": {"ce_weight": 0.25, "loss": {
        "kd": {"weight": 0.5, "temperature": {"start": 4, "end": 2, "kind": "linear"}},
        "fitnets": {"weight": 3.0, "pairs": [["block2", "layer2"]]}}}}}).students["s"]
    chosen = parse_loss(cfg.loss, "students.s")
    key = TeacherInput("layer2", "map")
    ctx = Context(num_classes=5, num_samples=10, student_shapes={"block2": (4, 6, 6)}, teacher_shapes={key: (8, 3, 3)})
    learner = Learner(_Net(), {n: methods()[n](c, ctx) for n, c in chosen.items()}, cfg)
    x = torch.randn(6, 1, 6, 6)
    teacher = TeacherOut([torch.randn(6, 5)], {key: torch.randn(6, 8, 3, 3)})
    batch = Batch(torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1.0, 0, 1, 1, 0, 0]), torch.arange(6))
    at = Progress(0.5, 1.0)
    total, logits, terms = learner(x, teacher, batch, at)

    out = learner.extractor(x)  # the same forward, its parts computed separately
    s64, t64 = out["logits"].double().detach().numpy(), teacher.logits[0].double().numpy()
    ce = masked_ce(out["logits"], batch.labels, batch.labeled).item()
    kd = _kd_reference(s64, t64, 3.0)  # temperature halfway from 4 to 2
    adapted = learner.methods["fitnets"].adapters[0](out["block2"]).double().detach().numpy()
    hint = ((adapted - teacher.features[key].double().numpy()) ** 2).mean()
    assert total.item() == pytest.approx(0.25 * ce + 0.5 * kd + 3.0 * hint, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5) and terms["kd"].item() == pytest.approx(kd, rel=1e-4)
    assert terms["kd.temperature"] == 3.0 and terms["fitnets.hint"].item() == pytest.approx(hint, rel=1e-4)


def test_a_method_config_refuses_keys_of_other_methods():
    with pytest.raises(LogitcacheError, match="unknown key 'student_layer'; kd takes weight, temperature, combine"):
        parse_loss({"kd": {"student_layer": "block2"}}, "students.s")
    with pytest.raises(LogitcacheError, match="students.s.loss: unknown method 'kdd'"):
        parse_loss({"kdd": {}}, "students.s")


def test_describe_lists_what_each_method_reads():
    info = {m["name"]: m for m in map(describe, methods().values())}
    assert info["kd"]["reads"] == ["logits"] and info["fitnets"]["reads"] == ["teacher layer2:map"]
    assert info["fitnets"]["keys"]["pairs"]["default"] == "required"


@pytest.mark.slow
def test_a_method_in_its_own_module_trains_end_to_end(data_cfg, cache_dir, tmp_path):
    """Defining a method in a module of its own, and nothing else, makes it trainable from the cache."""
    import custom_method  # noqa: F401  (registers logit_match)

    from logitcache.student.train import train_student

    params = validate({"data": data_cfg.model_dump(), "students": {"s": {
        "model": "cnn_tiny", "epochs": 1, "batch_size": 64, "workers": 0, "loss": {"logit_match": {"scale": 0.5}},
        "caches": [str(cache_dir / "train.h5")], "test_cache": str(cache_dir / "test.h5"),
        "out": str(tmp_path / "s")}}})
    metrics = train_student(params, "s")
    history = json.loads((tmp_path / "s" / "history.json").read_text())
    assert metrics["mode"] == "logit_match" and history[0]["loss/logit_match.mse"] > 0


@pytest.mark.slow
def test_dkd_and_sp_train_end_to_end_from_the_cache(data_cfg, cache_dir, tmp_path):
    from logitcache.student.train import train_student

    params = validate({"data": data_cfg.model_dump(), "students": {"s": {
        "model": "cnn_tiny", "epochs": 1, "batch_size": 64, "workers": 0, "labeled_fraction": 0.1,
        "loss": {"dkd": {"warmup": 0}, "sp": {"pairs": [["block2", "layer2"]]}},
        "caches": [str(cache_dir / "train.h5")], "test_cache": str(cache_dir / "test.h5"),
        "out": str(tmp_path / "s")}}})
    metrics = train_student(params, "s")
    history = json.loads((tmp_path / "s" / "history.json").read_text())
    assert metrics["mode"] == "dkd+sp"
    assert history[0]["loss/dkd.nckd"] > 0 and history[0]["loss/sp"] > 0
