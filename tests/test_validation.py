"""The validation split, checkpoint selection and step budgets: held-out rows are never trained on, the test split
is read once after training, the reported weights are the selected ones, and a budget is exactly its steps."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitcache.cache.reader import Cache
from logitcache.core.config import validate
from logitcache.core.data import holdout, load_split
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import load_model
from logitcache.core.training import Selector
from logitcache.student.train import train_student
from logitcache.teacher.train import train_teacher


def student_params(data_cfg, cache_dir, tmp_path, **student):
    settings = {"model": "cnn_tiny", "epochs": 1, "batch_size": 64, "lr": 0.05, "workers": 0,
                "caches": [str(cache_dir / "train.h5")], "test_cache": str(cache_dir / "test.h5"),
                "out": str(tmp_path / "student"), **student}
    return validate({"data": data_cfg.model_dump(), "students": {"s": settings}})


def test_holdout_is_seeded_fixed_and_disjoint():
    cfg = validate({"data": {"validation": 50, "validation_seed": 4}}).data
    train_rows, held = holdout(cfg, 600)
    assert len(held) == 50 and len(train_rows) == 550
    assert np.array_equal(np.union1d(train_rows, held), np.arange(600)) and not np.intersect1d(train_rows, held).size
    expected = np.sort(np.random.default_rng(4).permutation(600)[:50])  # the documented draw
    assert np.array_equal(held, expected)
    assert not np.array_equal(holdout(cfg.model_copy(update={"validation_seed": 5}), 600)[1], held)


def test_a_validation_split_of_half_the_rows_or_more_is_refused():
    cfg = validate({"data": {"validation": 300}}).data
    with pytest.raises(LogitcacheError, match=r"hold out more than half of the 599 training rows.*data.validation=59"):
        holdout(cfg, 599)


def test_select_best_without_a_validation_split_is_refused():
    with pytest.raises(LogitcacheError, match="students.s.select: best needs a validation split"):
        validate({"data": {"validation": 0}, "teacher": {"select": "last"}, "students": {"s": {}}})


def test_selector_keeps_the_first_best_weights_and_survives_a_round_trip():
    model = torch.nn.Linear(2, 1)
    best = Selector(model, "best")
    for round, (value, acc) in enumerate([(1.0, 0.5), (2.0, 0.7), (3.0, 0.7), (4.0, 0.6)], start=1):
        model.weight.data.fill_(value)
        best.update(round, {"val_acc": acc})
    again = Selector(model, "best")
    again.load_state_dict(best.state_dict())
    assert again.restore() == {"select": "best", "selected": 2, "val_acc": 0.7}  # the first of the two 0.7s
    assert torch.equal(model.weight, torch.full((1, 2), 2.0))
    last = Selector(model, "last")
    last.update(4, {"val_acc": 0.6})
    model.weight.data.fill_(9.0)
    assert last.restore()["selected"] == 4 and torch.equal(model.weight, torch.full((1, 2), 9.0))


@pytest.fixture
def reads(monkeypatch):
    """Every read of a prepared array file or a cache dataset, in order, with the training steps taken before it."""
    log, steps = [], [0]
    np_load, cache_read = np.load, Cache.read

    def load(path, *args, **kwargs):
        log.append((str(path), steps[0]))
        return np_load(path, *args, **kwargs)

    def read(self, name, selection=slice(None)):
        log.append((f"{self.path}:{name}", steps[0]))
        return cache_read(self, name, selection)

    def count_steps(original):
        def step(self, *args, **kwargs):
            steps[0] += 1
            return original(self, *args, **kwargs)
        return step

    monkeypatch.setattr(np, "load", load)
    monkeypatch.setattr(Cache, "read", read)
    monkeypatch.setattr(torch.optim.SGD, "step", count_steps(torch.optim.SGD.step))
    return log, steps


def test_student_reads_the_test_split_only_after_its_last_step(data_cfg, cache_dir, tmp_path, reads):
    log, steps = reads
    train_student(student_params(data_cfg, cache_dir, tmp_path, steps=12, evaluations=3), "s")
    test_reads = [at for what, at in log if Path(what).name.startswith("test")]
    assert steps[0] == 12 and test_reads and all(at == 12 for at in test_reads)
    assert any(at == 0 for what, at in log if Path(what).name.startswith("train"))  # the spy sees the reads before training


def test_teacher_reads_the_test_split_only_after_its_last_step(data_cfg, tmp_path, reads):
    log, steps = reads
    train_teacher(validate({"data": data_cfg.model_dump(), "teacher": {
        "model": "cnn_tiny", "epochs": 2, "batch_size": 64, "workers": 0, "out": str(tmp_path / "t")}}))
    test_reads = [at for what, at in log if Path(what).name.startswith("test")]
    assert steps[0] == 2 * (540 // 64) and test_reads and all(at == steps[0] for at in test_reads)


@pytest.mark.parametrize("loss", [{}, {"kd": {}}])
def test_no_validation_row_is_ever_trained_on(data_cfg, cache_dir, tmp_path, trained_on, loss):
    train_student(student_params(data_cfg, cache_dir, tmp_path, loss=loss, steps=30), "s")
    rows = np.concatenate([step["pairs"][:, 0] for step in trained_on])
    _, held = holdout(data_cfg, 600)
    assert len(trained_on) == 30 and len(rows) == 3 * 540 + 3 * 64  # 3 passes of 9 batches (the last of 28), 3 more
    assert not np.isin(rows, held).any()


def test_teacher_never_trains_on_a_validation_row(data_cfg, tmp_path, monkeypatch):
    from logitcache.core.data import IndexedDataset

    seen, getitem = [], IndexedDataset.__getitem__
    monkeypatch.setattr(IndexedDataset, "__getitem__", lambda self, i: seen.append(i) or getitem(self, i))
    train_teacher(validate({"data": data_cfg.model_dump(), "teacher": {
        "model": "cnn_tiny", "epochs": 1, "batch_size": 64, "workers": 0, "out": str(tmp_path / "t")}}))
    train_rows, held = holdout(data_cfg, 600)
    trained = seen[:8 * 64]  # the epoch's 8 full batches come first, then the validation pass
    assert len(set(trained)) == 8 * 64 and not np.isin(trained, held).any()
    assert sorted(seen[8 * 64:8 * 64 + len(held)]) == held.tolist()  # the validation pass scores exactly them


def _val_logits(model, data_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the held-out rows, computed here from the prepared arrays (channels-last, as trained)."""
    train = load_split(data_cfg, "train")
    _, held = holdout(data_cfg, len(train))
    x = train.images[held].float() / 255
    x = (x - torch.tensor(train.mean).view(1, -1, 1, 1)) / torch.tensor(train.std).view(1, -1, 1, 1)
    model = model.to(memory_format=torch.channels_last).eval()
    with torch.no_grad():
        return model(x.contiguous(memory_format=torch.channels_last)), train.labels[held]


def _val_accuracy(model, data_cfg) -> float:
    logits, labels = _val_logits(model, data_cfg)
    return (logits.argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize("select", ["best", "last"])
def test_the_reported_weights_are_the_selected_ones(data_cfg, cache_dir, tmp_path, select):
    params = student_params(data_cfg, cache_dir, tmp_path, steps=40, evaluations=5, lr=0.2, select=select)
    metrics = train_student(params, "s")
    history = json.loads((tmp_path / "student" / "history.json").read_text())
    scores = [h["val_acc"] for h in history]
    chosen = int(np.argmax(scores)) if select == "best" else len(scores) - 1  # argmax: the first of equals
    assert [h["steps"] for h in history] == [8, 16, 24, 32, 40]
    assert metrics["selected"] == chosen + 1 and metrics["selected_step"] == history[chosen]["steps"]
    assert metrics["val_acc"] == scores[chosen]
    model, _ = load_model(tmp_path / "student" / "student.pt")
    assert _val_accuracy(model, data_cfg) == scores[chosen]


def test_a_ce_student_loops_over_its_labeled_rows_for_its_whole_budget(data_cfg, cache_dir, tmp_path, trained_on):
    metrics = train_student(student_params(data_cfg, cache_dir, tmp_path, loss={}, labeled_fraction=0.25,
                                           steps=7, evaluations=2), "s")
    rows = np.concatenate([step["pairs"][:, 0] for step in trained_on])
    assert len(trained_on) == 7 and metrics["steps"] == 7 and metrics["samples"] == 2 * 135 + 64 == len(rows)
    first_pass = rows[:135]  # 135 labeled rows: passes of 2 full batches and a last one of 7
    assert len(set(first_pass.tolist())) == 135 and set(rows[135:].tolist()) <= set(first_pass.tolist())
    assert not np.array_equal(rows[135:270], first_pass)  # the second pass is shuffled anew


def test_labeled_rows_repeat_within_a_pass(data_cfg, cache_dir, tmp_path, trained_on):
    train_student(student_params(data_cfg, cache_dir, tmp_path, loss={"kd": {}}, labeled_fraction=0.1,
                                 labeled_repeat=4), "s")
    rows = np.concatenate([step["pairs"][:, 0] for step in trained_on])
    labeled = np.concatenate([step["batch"].labeled.numpy() for step in trained_on])
    counts = np.bincount(rows, minlength=600)
    assert len(rows) == 540 + 3 * 54  # every training row once and the 54 labeled ones 3 more times
    assert sorted(set(counts[rows[labeled]].tolist())) == [4] and sorted(set(counts[rows[~labeled]].tolist())) == [1]


def test_equal_budgets_give_equal_steps_whatever_the_rows(data_cfg, cache_dir, tmp_path):
    ce = train_student(student_params(data_cfg, cache_dir, tmp_path / "ce", loss={}, steps=20), "s")
    kd = train_student(student_params(data_cfg, cache_dir, tmp_path / "kd", steps=20), "s")
    assert ce["steps"] == kd["steps"] == 20  # 540 rows each: 2 passes of 9 batches (the last of 28), 2 more
    assert ce["samples"] == kd["samples"] == 2 * 540 + 2 * 64


def test_a_student_budget_resumes_at_the_evaluation_it_stopped_after(data_cfg, cache_dir, tmp_path, capsys,
                                                                     monkeypatch):
    import logitcache.student.run as student_train

    params = student_params(data_cfg, cache_dir, tmp_path, steps=30, evaluations=3)
    calls, fit = [], student_train.train_epoch

    def stop_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return fit(*args, **kwargs)

    monkeypatch.setattr(student_train, "train_epoch", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        train_student(params, "s")
    monkeypatch.setattr(student_train, "train_epoch", fit)
    resumed = train_student(params, "s", resume=True)
    assert f"{tmp_path / 'student' / 'resume.pt'}: resuming at evaluation 3 of 3" in capsys.readouterr().out
    whole = train_student(student_params(data_cfg, cache_dir, tmp_path / "whole", steps=30, evaluations=3), "s")
    assert resumed["test_acc"] == whole["test_acc"] and resumed["selected"] == whole["selected"]
    a = torch.load(tmp_path / "student" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "whole" / "student" / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_scores_match_an_independent_forward(data_cfg, cache_dir, tmp_path):
    params = student_params(data_cfg, cache_dir, tmp_path, steps=10, evaluations=1, select="last")
    metrics = train_student(params, "s")
    model, _ = load_model(tmp_path / "student" / "student.pt")
    logits, labels = _val_logits(model, data_cfg)
    assert metrics["val_acc"] == (logits.argmax(1) == labels).float().mean().item()
    history = json.loads((tmp_path / "student" / "history.json").read_text())
    assert history[-1]["val_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
