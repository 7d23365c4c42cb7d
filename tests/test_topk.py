"""Top-k caches: the k largest logits plus the leftover mass at each temperature of `dump.topk_temperatures`.

Every reference here is written in float64 from the full logits: softmax at T, the top-k probabilities, and
the mass of the classes outside the top-k.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from logitcache.cache.inspect import describe, verify
from logitcache.cache.reader import Cache
from logitcache.cache.topk import TopK, logits_from_topk, topk_summary
from logitcache.core.config import validate
from logitcache.core.errors import LogitcacheError
from logitcache.student.train import train_student
from logitcache.teacher.dump import dump_teacher

GRID = (1.0, 2.0, 4.0, 8.0)


def one_line(error: Exception, *words: str) -> None:
    assert "\n" not in str(error), str(error)
    for word in words:
        assert word in str(error), str(error)


def logits_of(n: int, classes: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def reference(full: torch.Tensor, k: int, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k indices, their probabilities at T, the leftover mass at T), in float64 from the full logits."""
    p = torch.softmax(full.double() / t, dim=-1)
    idx = full.double().topk(k, dim=-1).indices
    top = p.gather(-1, idx)
    others = torch.ones_like(p, dtype=torch.bool).scatter(-1, idx, False)
    return idx, top, (p * others).sum(-1)


def rebuilt(full: torch.Tensor, k: int, t: float, grid=GRID) -> torch.Tensor:
    """softmax(reconstruction / T) in float64."""
    return torch.softmax(topk_summary(full, k, grid).logits(t).double() / t, dim=-1)


@pytest.mark.parametrize("classes,k", [(10, 1), (10, 5), (100, 10), (1000, 10)])
@pytest.mark.parametrize("t", GRID)
def test_leftover_mass_and_topk_probabilities_are_the_full_ones_at_every_stored_temperature(classes, k, t):
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):  # float32: the rows as a cache holds them
        full = logits_of(64, classes).to(dtype)
        idx, top, left = reference(full, k, t)
        p = rebuilt(full, k, t)
        others = torch.ones_like(p, dtype=torch.bool).scatter(-1, idx, False)
        assert torch.allclose((p * others).sum(-1), left, rtol=rtol, atol=0), dtype
        assert torch.allclose(p.gather(-1, idx), top, rtol=rtol, atol=0), dtype


def test_the_missing_classes_share_their_mass_evenly():
    full = logits_of(8, 20)
    p = rebuilt(full, 4, 4.0)
    idx = full.topk(4, dim=-1).indices
    spread = p[torch.ones_like(p, dtype=torch.bool).scatter(-1, idx, False)].reshape(8, 16)
    assert torch.equal(spread, spread[:, :1].expand_as(spread))


def test_at_t1_the_fill_is_the_old_equal_fill_and_it_is_exact_there_only():
    full, k, c = logits_of(32, 100), 5, 100
    lse = torch.logsumexp(full, -1)
    idx = full.topk(k, -1).indices
    kept = torch.exp(full.gather(-1, idx) - lse[:, None]).sum(-1)
    old_fill = lse + torch.log1p(-kept) - np.log(c - k)  # every missing class: the leftover mass at T = 1, evenly
    old = torch.ones_like(full) * old_fill[:, None]
    old = old.scatter(-1, idx, full.gather(-1, idx))
    assert torch.allclose(topk_summary(full, k, GRID).logits(1.0), old, rtol=1e-13, atol=0)
    for t in (2.0, 4.0, 8.0):  # the old fill gives the missing classes too much mass above T = 1
        _, _, left = reference(full, k, t)
        q = torch.softmax(old / t, -1)
        old_left = q.sum(-1) - q.gather(-1, idx).sum(-1)
        assert (old_left > left * (1 + 1e-3)).all()
        assert torch.allclose(1 - rebuilt(full, k, t).gather(-1, idx).sum(-1), left, rtol=1e-9)


def test_logits_from_topk_takes_the_rest_at_its_temperature():
    full = logits_of(4, 30)
    top = topk_summary(full, 3, GRID)
    direct = logits_from_topk(top.values, top.indices, top.rest[:, 2], 30, 4.0)
    assert torch.equal(direct, top.logits(4.0))


def test_a_temperature_outside_the_grid_is_one_line():
    top = topk_summary(logits_of(2, 10), 3, (1.0, 4.0))
    with pytest.raises(LogitcacheError) as e:
        top.logits(3.0)
    one_line(e.value, "temperature 3 ", "[1, 4]", "dump.topk_temperatures")


@pytest.mark.parametrize("grid,words", [([2, 1], "increasing"), ([1, 1], "distinct"), ([0, 1], "positive"),
                                        ([], "at least one temperature")])
def test_the_grid_is_validated(grid, words):
    with pytest.raises(LogitcacheError) as e:
        validate({"dump": {"topk": 3, "topk_temperatures": grid}})
    one_line(e.value, "topk_temperatures", words)


def dump(data_cfg, teacher_ckpt, out, **settings):
    return dump_teacher(validate({"data": data_cfg.model_dump(), "dump": {
        "teacher": str(teacher_ckpt), "out": str(out), "views": 2, "layers": [], "batch_size": 96, "workers": 0,
        "splits": ["train"], "logits_dtype": "float32", **settings}}))[0]


@pytest.fixture(scope="module")
def caches(data_cfg, teacher_ckpt, shared_folder):
    """A full-logit and a top-3 cache (grid 1, 4) of the same teacher and views, float32 logits, and a top-3 cache
    with float16 values (the default dtype)."""
    def make(out):
        dump(data_cfg, teacher_ckpt, out / "full")
        dump(data_cfg, teacher_ckpt, out / "top", topk=3, topk_temperatures=[1, 4])
        dump(data_cfg, teacher_ckpt, out / "top16", topk=3, topk_temperatures=[1, 4], logits_dtype="float16")
    root = shared_folder("topk_caches", make)
    return root / "full" / "train.h5", root / "top" / "train.h5", root / "top16" / "train.h5"


def test_a_dumped_topk_cache_is_right_at_each_of_its_temperatures(caches):
    full_path, top_path, _ = caches
    with Cache(full_path) as full, Cache(top_path) as top:
        assert top.topk == 3 and top.topk_temperatures == (1.0, 4.0) and full.topk_temperatures is None
        assert top.read("topk_rest").shape == (600, 2, 2)
        logits = full.logits().double()
        for t in (1.0, 4.0):
            idx, probs, left = reference(logits, 3, t)
            p = torch.softmax(top.logits(temperature=t).double() / t, -1)
            assert torch.equal(top.topk_rows().indices, idx)
            assert torch.allclose(p.gather(-1, idx), probs, rtol=1e-6, atol=0)
            assert torch.allclose(1 - p.gather(-1, idx).sum(-1), left, rtol=1e-5, atol=1e-12)
        assert torch.equal(full.logits(temperature=4.0), full.logits())  # full logits ignore the temperature
        with pytest.raises(LogitcacheError) as e:
            top.logits(temperature=2.0)
        one_line(e.value, "temperature 2 ", "[1, 4]", "dump.topk_temperatures")
        assert top.meta["teacher_accuracy"] == full.meta["teacher_accuracy"]


def test_inspect_shows_the_grid_and_verify_checks_the_rest(caches, data_cfg, teacher_ckpt):
    _, top_path, _ = caches
    info = describe(top_path)
    assert info["topk"] == 3 and info["topk_temperatures"] == [1.0, 4.0]
    report = verify(top_path, teacher_ckpt, data_cfg, samples=16)
    assert report["ok"] and report["max_abs_rest_diff"] <= 1e-4 and "kl_t1" in report


def test_a_topk_cache_of_the_older_layout_is_refused_with_the_fix(caches, tmp_path):
    old = tmp_path / "old.h5"
    old.write_bytes(caches[1].read_bytes())
    with h5py.File(old, "r+") as f:
        f["topk_lse"] = f["topk_rest"][:, :, 0]
        del f["topk_rest"], f.attrs["topk_temperatures"]
    with pytest.raises(LogitcacheError) as e:
        Cache(old)
    one_line(e.value, "older layout", "re-dump", "dump.topk_temperatures")


def student(data_cfg, out, cache, **settings):
    return validate({"data": data_cfg.model_dump(), "students": {"s": {
        "model": "cnn_tiny", "epochs": 1, "batch_size": 128, "workers": 0, "caches": [str(cache)],
        "test_cache": None, "out": str(out), **settings}}})


@pytest.mark.parametrize("loss,words", [
    ({"kd": {"temperature": 2}}, "students.s.loss.kd.temperature is 2"),
    ({"dkd": {"temperature": 8}}, "students.s.loss.dkd.temperature is 8"),
    ({"kd": {"temperature": {"start": 4, "end": 1, "kind": "linear"}}}, "linear schedule"),
    ({"kd": {"temperature": {"start": 4, "end": 2, "kind": "switch"}}}, "is 2"),
    ({"kd": {"temperature": {"start": 4, "kind": "step", "factor": 0.5, "every": 0.5}}}, "is 2"),  # 2nd half-epoch
])
def test_a_student_temperature_outside_the_grid_is_refused_before_training(caches, data_cfg, tmp_path, loss, words):
    with pytest.raises(LogitcacheError) as e:
        train_student(student(data_cfg, tmp_path / "s", caches[1], loss=loss), "s")
    one_line(e.value, words, "[1, 4]")
    assert not (tmp_path / "s").exists()


def test_a_step_schedule_through_grid_temperatures_trains_reading_each(caches, data_cfg, tmp_path, trained_on):
    schedule = {"start": 4, "kind": "step", "factor": 0.25, "every": 0.5}  # T = 4, then 1 from half an epoch on
    train_student(student(data_cfg, tmp_path / "s", caches[1], loss={"kd": {"temperature": schedule}}), "s")
    assert len(trained_on) == 5
    with Cache(caches[0]) as full:
        logits = full.logits().double()
    for step, t in zip(trained_on, (4.0, 4.0, 4.0, 1.0, 1.0)):  # step s is at epoch s / 5
        rows, views = step["pairs"].T
        [target] = step["targets"].logits_at(t)
        idx, _, left = reference(logits[rows, views], 3, t)
        p = torch.softmax(target.double() / t, -1)
        assert torch.allclose(1 - p.gather(-1, idx).sum(-1), left, rtol=1e-5, atol=1e-12)


def test_a_student_reads_the_topk_cache_at_its_temperature(caches, data_cfg, tmp_path, trained_on):
    train_student(student(data_cfg, tmp_path / "s", caches[1], loss={"kd": {"temperature": 4}}), "s")
    with Cache(caches[0]) as full:
        logits = full.logits().double()
    for step in trained_on[:2]:
        rows, views = step["pairs"].T
        [target] = step["targets"].logits_at(4.0)
        idx, probs, left = reference(logits[rows, views], 3, 4.0)
        p = torch.softmax(target.double() / 4, -1)
        assert torch.allclose(p.gather(-1, idx), probs, rtol=1e-6, atol=0)
        assert torch.allclose(1 - p.gather(-1, idx).sum(-1), left, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("which", [1, 2], ids=["float32", "float16"])
def test_online_targets_of_a_topk_cache_equal_the_cached_ones(caches, data_cfg, teacher_ckpt, tmp_path, trained_on,
                                                              which):
    for online in (False, True):
        train_student(student(data_cfg, tmp_path / f"s{online}", caches[which], loss={"kd": {"temperature": 4}},
                              online=online, teacher=str(teacher_ckpt)), "s")
    steps = len(trained_on) // 2
    assert steps == 5  # 540 training rows in batches of 128
    for cached, live in zip(trained_on[:steps], trained_on[steps:]):
        assert np.array_equal(cached["pairs"], live["pairs"])
        [a], [b] = cached["targets"].targets, live["targets"].targets
        assert isinstance(a, TopK) and isinstance(b, TopK)
        assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices) and torch.equal(a.rest, b.rest)
        assert torch.equal(cached["loss"], live["loss"])


def test_a_topk_test_cache_needs_t1_for_the_kl_it_scores(caches, data_cfg, teacher_ckpt, tmp_path):
    test = dump(data_cfg, teacher_ckpt, tmp_path / "test", topk=3, topk_temperatures=[2, 4], splits=["test"])
    with pytest.raises(LogitcacheError) as e:
        train_student(student(data_cfg, tmp_path / "s", caches[1], test_cache=str(test)), "s")
    one_line(e.value, "the test metrics' temperature (KL to the teacher) is 1", "[2, 4]", "dump.topk_temperatures")
    assert not (tmp_path / "s").exists()


def test_inspect_prints_the_grid(caches):
    from click.testing import CliRunner

    from logitcache.cli import main

    result = CliRunner().invoke(main, ["inspect", str(caches[1])])
    assert result.exit_code == 0, result.output
    assert "top-k      3 largest logits per view, right at temperatures 1, 4" in result.output
