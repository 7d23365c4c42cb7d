import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from logitcache.cache.format import form_dataset
from logitcache.cli import main
from logitcache.core import speed
from logitcache.core.config import validate
from logitcache.core.data import holdout, load_split
from logitcache.core.errors import LogitcacheError
from logitcache.core.views import ViewRenderer, ViewSpec
from logitcache.student.methods import TeacherInput
from logitcache.student.plan import labeled_mask, plan_run
from logitcache.student.sources import make_batches
from logitcache.student.train import train_student
from logitcache.teacher.dump import ViewDataset, dump_teacher


def student_params(data_cfg, cache_dir, tmp_path, **student):
    settings = {"model": "cnn_tiny", "epochs": 2, "batch_size": 64, "lr": 0.05, "workers": 0,
                "caches": [str(cache_dir / "train.h5")], "test_cache": str(cache_dir / "test.h5"),
                "out": str(tmp_path / "student"), **student}
    return validate({"data": data_cfg.model_dump(), "students": {"s": settings}})


@pytest.mark.slow
def test_kd_student_learns_and_evaluate_reproduces_its_accuracy(data_cfg, cache_dir, tmp_path):
    params = student_params(data_cfg, cache_dir, tmp_path, epochs=6)
    metrics = train_student(params, "s")
    history = json.loads((tmp_path / "student" / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["test_acc"] > 0.3 and metrics["agreement"] > 0.3
    for key in ("test_top5", "kl_to_teacher", "params", "compression", "latency_ms", "latency_p90_ms",
                "seconds_per_epoch"):
        assert metrics[key] is not None and metrics[key] > 0, key
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "student" / "student.pt")])
    assert result.exit_code == 0, result.output
    again = json.loads(result.output)
    assert again["test_acc"] == metrics["test_acc"] and again["agreement"] == metrics["agreement"]


def test_same_seed_same_student(data_cfg, cache_dir, tmp_path):
    a = train_student(student_params(data_cfg, cache_dir, tmp_path / "a", epochs=1), "s")
    b = train_student(student_params(data_cfg, cache_dir, tmp_path / "b", epochs=1), "s")
    assert a["test_acc"] == b["test_acc"] and a["kl_to_teacher"] == b["kl_to_teacher"]


def test_a_run_with_latency_off_times_nothing_and_records_null(data_cfg, cache_dir, tmp_path, monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("timed with latency: false")

    monkeypatch.setattr(speed, "timings", no_timing)  # every batch-1 timing goes through it
    params = student_params(data_cfg, cache_dir, tmp_path, epochs=1, seeds=[0, 1], latency=False)
    summary = train_student(params, "s")
    for seed in (0, 1):
        metrics = json.loads((tmp_path / "student" / "runs" / f"seed{seed}" / "metrics.json").read_text())
        assert metrics["latency_ms"] is None and metrics["latency_p90_ms"] is None and metrics["test_acc"] > 0
    assert "latency_ms" not in summary and "latency_ms" not in summary["per_seed"]["0"]
    with pytest.raises(AssertionError, match="latency: false"):  # the default times
        train_student(student_params(data_cfg, cache_dir, tmp_path / "timed", epochs=1), "s")


HINT = {"pairs": [["block2", "layer2"]], "distance": "cosine"}


@pytest.mark.parametrize(("loss", "mode"), [({}, "ce"), ({"fitnets": HINT}, "fitnets"),
                                            ({"kd": {}, "fitnets": HINT}, "kd+fitnets")])
def test_other_losses_train(data_cfg, cache_dir, tmp_path, loss, mode):
    params = student_params(data_cfg, cache_dir, tmp_path, loss=loss, epochs=1)
    metrics = train_student(params, "s")
    assert metrics["mode"] == mode
    ckpt = torch.load(tmp_path / "student" / "student.pt", weights_only=True)
    assert bool(ckpt["adapters"]) == ("fitnets" in loss)  # adapters kept apart from the student weights
    assert not any(k.startswith("adapter") for k in ckpt["state_dict"])
    history = json.loads((tmp_path / "student" / "history.json").read_text())
    assert {f"loss/{m}" for m in ("ce", *({"fitnets": "fitnets.hint"}.get(k, k) for k in loss))} <= history[0].keys()


def test_replayed_views_fed_to_the_student_equal_the_dumped_inputs(data_cfg, cache_dir, tmp_path):
    params = student_params(data_cfg, cache_dir, tmp_path, loss={"kd": {}, "fitnets": HINT})
    cfg = params.students["s"]
    plan = plan_run(params, cfg, "s")
    split = plan.train
    dataset, sampler = make_batches(cfg, plan)
    dumped = ViewDataset(split, plan.cache.views, ViewRenderer(ViewSpec(2, True)))
    sampler.set_epoch(1)
    pairs = next(iter(sampler))
    batch = dataset[pairs]
    images, rows, logits, features = batch.images, batch.rows, batch.logits, batch.features
    assert rows.tolist() == [row for row, _ in pairs]
    assert len({v for _, v in pairs}) > 1
    with h5py.File(cache_dir / "train.h5") as f:
        for k, (row, view) in enumerate(pairs):
            assert np.array_equal(images[k].numpy(), dumped[row][0][view].numpy())
            assert np.array_equal(logits[0][k].numpy(), f["logits"][row, view].astype(np.float32))
            assert np.array_equal(features[TeacherInput("layer2", "map")][k].numpy(),
                                  f["features/layer2"][row, view].astype(np.float32))


def test_round_robin_cycles_views_and_random_varies(data_cfg, cache_dir, tmp_path):
    from logitcache.student.batches import ViewBatchSampler

    def views_by_row(sampler, epoch):
        sampler.set_epoch(epoch)
        return {int(r): int(v) for batch in sampler for r, v in batch}

    rr = ViewBatchSampler(np.arange(10), 3, 4, "round_robin", 0)
    for epoch in range(3):  # row r shows view (r + epoch) mod 3: every view once in 3 epochs
        assert views_by_row(rr, epoch) == {r: (r + epoch) % 3 for r in range(10)}
    rows = np.arange(300)
    random = ViewBatchSampler(rows, 3, 50, "random", 0)
    drawn = [views_by_row(random, epoch) for epoch in range(3)]
    assert all(d.keys() == set(range(300)) for d in drawn)  # every row once per epoch
    assert drawn[0] == views_by_row(ViewBatchSampler(rows, 3, 50, "random", 0), 0)  # a function of (seed, epoch)
    assert drawn[0] != views_by_row(ViewBatchSampler(rows, 3, 50, "random", 1), 0)  # and of the seed
    for epoch, views in enumerate(drawn):
        counts = np.bincount(list(views.values()), minlength=3)
        assert counts.min() > 60  # each of the 3 views about a third of the rows, not one view for all
        cyclic = sum(v == (r + epoch) % 3 for r, v in views.items())
        assert cyclic < 150  # not the round-robin order (about a third agree by chance)
    changed = sum(drawn[0][r] != drawn[1][r] for r in range(300))
    assert 150 < changed < 250  # a row's view is drawn afresh each epoch: it changes for about 2/3 of the rows


def test_labeled_fraction_masks_ce_rows(tmp_path):
    params = validate({"data": {"validation": 60}, "students": {"s": {"labeled_fraction": 0.1, "labels_seed": 3}}})
    train_rows, held = holdout(params.data, 600)
    mask = labeled_mask(params.students["s"], 600, train_rows)
    assert mask.sum() == 54 and not mask[held].any()  # 10 % of the 540 training rows, no validation row
    other_seed = params.students["s"].model_copy(update={"seed": 9})
    assert np.array_equal(labeled_mask(other_seed, 600, train_rows), mask)  # same labeled rows for every student seed
    path = tmp_path / "labeled.json"
    chosen = train_rows[[1, 5, 7]].tolist()
    path.write_text(json.dumps(chosen))
    explicit = params.students["s"].model_copy(update={"labeled_indices": str(path)})
    assert np.flatnonzero(labeled_mask(explicit, 600, train_rows)).tolist() == chosen
    path.write_text(json.dumps([chosen[0], 900]))
    with pytest.raises(LogitcacheError, match=r"in \[0, 600\)"):
        labeled_mask(explicit, 600, train_rows)
    path.write_text(json.dumps([chosen[0], int(held[3])]))
    with pytest.raises(LogitcacheError, match=rf"include 1 validation row\(s\), first \[{held[3]}\]"):
        labeled_mask(explicit, 600, train_rows)


def test_ce_with_labeled_fraction_trains_on_labeled_rows_only(data_cfg, cache_dir, tmp_path, trained_on):
    metrics = train_student(student_params(data_cfg, cache_dir, tmp_path, loss={}, epochs=1,
                                           labeled_fraction=0.25), "s")
    assert metrics["labeled"] == 135  # a quarter of the 540 rows left after the 60 validation rows
    train_rows, held = holdout(data_cfg, 600)
    labeled = np.random.default_rng(0).permutation(train_rows)[:135]  # the documented draw, labels_seed 0
    rows = np.concatenate([step["batch"].rows.numpy() for step in trained_on])
    assert sorted(rows.tolist()) == sorted(labeled.tolist())  # one pass: each labeled row once, no other row
    assert not np.isin(rows, held).any()
    assert all(bool(step["batch"].labeled.all()) for step in trained_on)  # CE used every label it was shown
    shown = torch.cat([step["batch"].labels for step in trained_on])
    assert torch.equal(shown, load_split(data_cfg, "train").labels[rows])  # each row with its own label


@pytest.mark.slow
def test_several_caches_must_share_views(data_cfg, teacher_ckpt, cache_dir, tmp_path):
    dump_teacher(validate({"data": data_cfg.model_dump(), "dump": {
        "teacher": str(teacher_ckpt), "out": str(tmp_path / "other"), "views": 3, "seed": 5, "workers": 0,
        "splits": ["train"]}}))
    params = student_params(data_cfg, cache_dir, tmp_path, caches=[str(cache_dir / "train.h5"),
                                                                   str(tmp_path / "other" / "train.h5")])
    with pytest.raises(LogitcacheError, match="other views"):
        train_student(params, "s")
    same = student_params(data_cfg, cache_dir, tmp_path, epochs=1, loss={"kd": {"combine": "kl"}},
                          caches=[str(cache_dir / "train.h5"), str(cache_dir / "train.h5")])
    assert train_student(same, "s")["test_acc"] > 0


def _copy(cache_dir, tmp_path, name="train.h5"):
    dst = tmp_path / name
    shutil.copy(cache_dir / name, dst)
    return dst


@pytest.mark.parametrize("damage, words", [
    (lambda f: f.attrs.__setitem__("schema_version", "99"), "schema version 99"),
    (lambda f: f.attrs.__setitem__("complete", "false"), "incomplete"),
    (lambda f: f["labels"].__setitem__(4, (f["labels"][4] + 1) % 10), "labels differ from the data at 1 row(s), first [4]"),
    (lambda f: f.attrs.__setitem__("teacher", "{not json"), "attribute 'teacher' is not valid JSON"),
    (lambda f: f.__delitem__("logits"), "dataset(s) logits missing"),
])
def test_damaged_or_mismatched_cache_is_refused(data_cfg, cache_dir, tmp_path, damage, words):
    path = _copy(cache_dir, tmp_path)
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(LogitcacheError) as e:
        train_student(student_params(data_cfg, cache_dir, tmp_path, caches=[str(path)]), "s")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_cache_of_another_split_or_data_is_refused(data_cfg, cache_dir, tmp_path):
    with pytest.raises(LogitcacheError, match="cache was made from split 'test', the training data has split 'train'"):
        train_student(student_params(data_cfg, cache_dir, tmp_path, caches=[str(cache_dir / "test.h5")]), "s")
    other = data_cfg.model_copy(update={"root": str(tmp_path / "other"), "train_limit": 500})
    from logitcache.core.data import prepare_data
    prepare_data(other)
    params = validate({"data": other.model_dump(), "students": {"s": {
        "caches": [str(cache_dir / "train.h5")], "out": str(tmp_path / "s"), "workers": 0}}})
    with pytest.raises(LogitcacheError, match="cache was made from count 600, the training data has count 500"):
        train_student(params, "s")


def test_random_augmentation_on_a_cache_is_refused_unless_forced(data_cfg, teacher_ckpt, cache_dir, tmp_path):
    aug = {"crop_padding": 2, "flip": True, "policy": []}
    with pytest.raises(LogitcacheError, match="inputs the teacher never saw"):
        train_student(student_params(data_cfg, cache_dir, tmp_path, augment=aug), "s")
    [one_view] = dump_teacher(validate({"data": data_cfg.model_dump(), "dump": {
        "teacher": str(teacher_ckpt), "out": str(tmp_path / "one"), "views": 1, "workers": 0, "splits": ["train"]}}))
    with pytest.raises(LogitcacheError, match="force_augment"):
        train_student(student_params(data_cfg, cache_dir, tmp_path, augment=aug, caches=[str(one_view)]), "s")
    forced = student_params(data_cfg, cache_dir, tmp_path, augment=aug, caches=[str(one_view)], force_augment=True,
                            epochs=1)
    assert train_student(forced, "s")["test_acc"] > 0


def test_over_budget_columns_read_from_disk_equal_in_memory(cache_dir):
    import pickle

    from logitcache.student.batches import CachedColumn

    for name in ("logits", "features/layer2"):
        ram = CachedColumn(cache_dir / "train.h5", name, budget_bytes=1e12)
        disk = CachedColumn(cache_dir / "train.h5", name, budget_bytes=0)
        assert ram.array is not None and disk.array is None
        rows, views = np.array([5, 3, 5, 599]), np.array([0, 2, 1, 2])
        assert np.array_equal(ram.take(rows, views).numpy(), disk.take(rows, views).numpy())
        clone = pickle.loads(pickle.dumps(disk))  # what a DataLoader worker receives: no open h5py handle
        assert clone._cache is None and np.array_equal(clone.take(rows, views).numpy(), disk.take(rows, views).numpy())


def test_workers_read_the_cache_lazily(data_cfg, cache_dir, tmp_path, monkeypatch):
    """Over budget, no column is read into memory and the main process opens no handle to read batches: each loader
    worker opens the file at its first batch and keeps it for the next ones."""
    import os

    from logitcache.student.batches import CachedColumn

    log, take = tmp_path / "takes.txt", CachedColumn.take

    def logged(self, rows, views):  # runs in the worker (forked: it inherits this patch), so it logs to a file
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {self.name} {self.array is None} {self._cache is None}\n")
        return take(self, rows, views)

    monkeypatch.setattr(CachedColumn, "take", logged)
    params = student_params(data_cfg, cache_dir, tmp_path, loss={"kd": {}, "fitnets": HINT}, epochs=1, workers=1,
                            feature_budget_mb=0)
    train_student(params, "s")
    calls = [line.split() for line in log.read_text().splitlines()]
    assert calls and all(pid != str(os.getpid()) for pid, *_ in calls)  # batches are built in workers only
    assert all(not_in_memory == "True" for _, _, not_in_memory, _ in calls)  # over budget: nothing read into RAM
    unopened: dict[tuple[str, str], list[str]] = {}
    for pid, column, _, closed in calls:
        unopened.setdefault((pid, column), []).append(closed)
    assert {column for _, column in unopened} == {"logits", "features/layer2"}
    for seen in unopened.values():  # each worker opens each file at its first batch, then keeps it open
        assert seen == ["True"] + ["False"] * (len(seen) - 1)
    assert max(map(len, unopened.values())) == 9  # one worker built the pass's 9 batches


def cached(path, name, pairs) -> torch.Tensor:
    """Array `name` of the cache at `path` for the (row, view) pairs, read straight from the HDF5 file."""
    with h5py.File(path, "r") as f:
        return torch.from_numpy(f[name][()][pairs[:, 0], pairs[:, 1]])


def test_online_targets_equal_the_cached_targets_of_the_same_pairs(data_cfg, teacher_ckpt, cache_dir, tmp_path,
                                                                  trained_on):
    params = student_params(data_cfg, cache_dir, tmp_path, loss={"kd": {}, "fitnets": HINT}, epochs=1, online=True,
                            teacher=str(teacher_ckpt))
    assert train_student(params, "s")["online"]
    assert len(trained_on) == 9  # 540 training rows (600 less 60 validation rows) in batches of 64
    for step in trained_on:
        assert torch.equal(step["targets"].logits[0], cached(cache_dir / "train.h5", "logits", step["pairs"]).float())
        assert torch.equal(step["targets"].features[TeacherInput("layer2", "map")],
                           cached(cache_dir / "train.h5", "features/layer2", step["pairs"]).float())
    other = tmp_path / "other.pt"
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    ckpt["state_dict"]["fc.bias"] += 0.01
    torch.save(ckpt, other)
    with pytest.raises(LogitcacheError, match="not the checkpoint the cache was made from"):
        train_student(student_params(data_cfg, cache_dir, tmp_path / "x", online=True, teacher=str(other)), "s")


def kd_float64(student: torch.Tensor, teachers: list[torch.Tensor], t: float, combine: str) -> torch.Tensor:
    """Hinton KD in float64: T^2 KL(teacher || student) at temperature T, batch mean; several teachers either
    through the average of their softened distributions (probs) or as the average of their KL terms (kl)."""
    log_s = torch.log_softmax(student.double() / t, dim=1)
    probs = [torch.softmax(teacher.double() / t, dim=1) for teacher in teachers]

    def kl(p):
        return (p * (p.log() - log_s)).sum(1).mean() * t**2

    return kl(sum(probs) / len(probs)) if combine == "probs" else sum(kl(p) for p in probs) / len(probs)


def kd_loss_float64(step, teachers, t=4.0, weight=0.9, ce_weight=1.0, combine="probs") -> torch.Tensor:
    """The whole objective of one step of a default KD student, every row labeled: weight KD + ce_weight CE."""
    ce = torch.nn.functional.cross_entropy(step["logits"].double(), step["batch"].labels)
    return weight * kd_float64(step["logits"], teachers, t, combine) + ce_weight * ce


def topk_reconstruction_float64(path, pairs, t: float, num_classes=10) -> torch.Tensor:
    """Full logits from a top-k cache (grid 1, 2, 4, 8) for temperature T: stored classes exact, the others share
    the leftover mass at T evenly, each with logit T * (log-sum-exp of the missing logits / T - log(C - k))."""
    values = cached(path, "topk_values", pairs).double()
    indices = cached(path, "topk_indices", pairs).long()
    rest = cached(path, "topk_rest", pairs).double()[:, [1.0, 2.0, 4.0, 8.0].index(t)]
    fill = t * (rest - np.log(num_classes - values.shape[1]))
    return fill[:, None].repeat(1, num_classes).scatter(1, indices, values)


@pytest.mark.slow
def test_student_of_a_topk_cache_trains_on_the_topk_reconstruction(data_cfg, teacher_ckpt, cache_dir, tmp_path,
                                                                   trained_on):
    [topk] = dump_teacher(validate({"data": data_cfg.model_dump(), "dump": {
        "teacher": str(teacher_ckpt), "out": str(tmp_path / "topk"), "views": 3, "layers": [], "topk": 3,
        "workers": 0, "splits": ["train"]}}))
    metrics = train_student(student_params(data_cfg, cache_dir, tmp_path, epochs=1, caches=[str(topk)]), "s")
    assert metrics["mode"] == "kd" and (tmp_path / "student" / "student.pt").is_file()
    for step in trained_on[:3]:
        for t in (1.0, 4.0):  # the targets at T=1 (methods without a temperature), and those KD reads at T=4
            expected = topk_reconstruction_float64(topk, step["pairs"], t)
            [target] = step["targets"].logits_at(t)
            diff = ((target.double() / t).softmax(1) - (expected / t).softmax(1)).abs().max().item()
            assert diff <= 5e-6, diff  # float32 targets: a few ulps of the probabilities
        expected = topk_reconstruction_float64(topk, step["pairs"], 4.0)
        assert torch.allclose(step["loss"].double(), kd_loss_float64(step, [expected]), rtol=1e-5, atol=1e-7)
    full = cached(cache_dir / "train.h5", "logits", trained_on[0]["pairs"]).double()
    assert not torch.allclose(full, topk_reconstruction_float64(topk, trained_on[0]["pairs"], 4.0), atol=1e-2)


@pytest.fixture(scope="module")
def second_cache(data_cfg, shared_folder):
    """train.h5 of a second teacher (seed 1), with the same views as the session cache (dump seed 0, 3 views)."""
    from logitcache.teacher.train import train_teacher

    def make(out):
        train_teacher(validate({"data": data_cfg.model_dump(), "teacher": {
            "model": "resnet8", "epochs": 3, "batch_size": 32, "lr": 0.05, "workers": 0, "seed": 1,
            "out": str(out / "teacher")}}))
        dump_teacher(validate({"data": data_cfg.model_dump(), "dump": {
            "teacher": str(out / "teacher" / "teacher.pt"), "out": str(out / "cache"), "views": 3, "layers": [],
            "workers": 0, "splits": ["train"]}}))

    return shared_folder("second", make) / "cache" / "train.h5"


@pytest.mark.slow
@pytest.mark.parametrize("combine", ["probs", "kl"])
def test_two_different_teachers_combine_as_their_formula_says(data_cfg, cache_dir, second_cache, tmp_path,
                                                              trained_on, combine):
    caches = [cache_dir / "train.h5", second_cache]
    params = student_params(data_cfg, cache_dir, tmp_path, epochs=1, caches=[str(c) for c in caches],
                            loss={"kd": {"combine": combine}})
    metrics = train_student(params, "s")
    assert metrics["mode"] == "kd" and (tmp_path / "student" / "student.pt").is_file()
    other = {"probs": "kl", "kl": "probs"}[combine]
    for step in trained_on[:3]:
        teachers = [cached(c, "logits", step["pairs"]).double() for c in caches]
        assert not torch.equal(teachers[0], teachers[1])  # two different teachers
        for target, teacher in zip(step["targets"].logits, teachers):
            assert torch.equal(target.double(), teacher)
        expected = kd_loss_float64(step, teachers, combine=combine)
        assert torch.allclose(step["loss"].double(), expected, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(kd_loss_float64(step, teachers, combine=other), expected, rtol=1e-4)


@pytest.mark.parametrize("settings, words", [
    ({"force_augment": True}, "force_augment needs augment"),
    ({"loss": {"fitnets": {"pairs": [["block9", "layer2"]]}}}, "unknown student layer.* 'block9'"),
    ({"loss": {"fitnets": {"pairs": [["block2", "layer3"]]}}}, "does not store layer3:map"),
    ({"loss": {"kd": {"student_layer": "block2"}}}, "unknown key 'student_layer'; kd takes weight, temperature, combine"),
    ({"loss": {"distil": {}}}, "unknown method 'distil'"),
])
def test_bad_student_settings_are_one_line_errors(data_cfg, cache_dir, tmp_path, settings, words):
    with pytest.raises(LogitcacheError, match=words):
        train_student(student_params(data_cfg, cache_dir, tmp_path, **settings), "s")


@pytest.mark.parametrize("content", ["[]", "[1.5, 2.7]", "[true]", "{\"a\": 1}", "not json"])
def test_bad_labeled_indices_files_are_refused(tmp_path, content):
    path = tmp_path / "labeled.json"
    path.write_text(content)
    cfg = validate({"students": {"s": {"labeled_indices": str(path)}}}).students["s"]
    with pytest.raises(LogitcacheError, match="non-empty JSON list of integer"):
        labeled_mask(cfg, 600, np.arange(600))


def test_negative_seeds_are_refused():
    with pytest.raises(LogitcacheError, match="seed"):
        validate({"students": {"s": {"seed": -1}}})


def test_the_same_weights_whether_the_cache_is_held_in_memory_or_read_from_disk(data_cfg, cache_dir, tmp_path):
    import torch

    weights = []
    for budget in (1024, 0):
        out = tmp_path / f"budget{budget}"
        params = student_params(data_cfg, cache_dir, out, epochs=1, loss={"kd": {}, "fitnets": HINT},
                                feature_budget_mb=budget)
        train_student(params, "s")
        weights.append(torch.load(out / "student" / "student.pt", weights_only=True)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.fixture(scope="module")
def forms_cache(data_cfg, teacher_ckpt, shared_folder):
    """train.h5 and test.h5 storing every form the methods read: layer2 map and attention, layer3 embedding."""
    return shared_folder("forms", lambda out: dump_teacher(validate({"data": data_cfg.model_dump(), "dump": {
        "teacher": str(teacher_ckpt), "out": str(out), "views": 2, "feature_pool": 2, "workers": 0,
        "layers": [{"name": "layer2", "forms": ["map", "attention"]}, {"name": "layer3", "forms": ["embedding"]}]}})))


EVERY_METHOD = {
    "kd": {}, "dkd": {}, "fitnets": HINT, "at": {"pairs": [["block2", "layer2"]]},
    "sp": {"pairs": [["block3", "layer3"]], "form": "embedding"}, "rkd": {"student": "block3", "teacher": "layer3"},
    "pkt": {"student": "block3", "teacher": "layer3"}, "crd": {"student": "block3", "teacher": "layer3", "negatives": 64},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(EVERY_METHOD))
def test_every_method_trains_from_the_cache_and_online_on_the_same_targets(data_cfg, teacher_ckpt, forms_cache,
                                                                           tmp_path, trained_on, method):
    from logitcache.student.methods import methods

    assert set(EVERY_METHOD) == set(methods()) - {"logit_match"}  # every built-in method is covered
    loss = {method: EVERY_METHOD[method]}
    for online in (False, True):
        params = validate({"data": data_cfg.model_dump(), "students": {"s": {
            "model": "cnn_tiny", "epochs": 1, "batch_size": 100, "workers": 0, "loss": loss, "online": online,
            "teacher": str(teacher_ckpt), "caches": [str(forms_cache / "train.h5")],
            "test_cache": str(forms_cache / "test.h5"), "out": str(tmp_path / f"online{online}")}}})
        metrics = train_student(params, "s")
        history = json.loads((tmp_path / f"online{online}" / "history.json").read_text())
        assert metrics["mode"] == method and metrics["online"] == online
        assert all(np.isfinite(v) for k, v in history[0].items() if k.startswith("loss/"))
    steps = len(trained_on) // 2  # the cached run's steps, then the online run's, over the same pairs
    assert steps == 6
    for cached_step, online_step in zip(trained_on[:steps], trained_on[steps:]):
        assert np.array_equal(cached_step["pairs"], online_step["pairs"])
        assert len(online_step["targets"].logits) == len(cached_step["targets"].logits)
        for a, b in zip(cached_step["targets"].logits, online_step["targets"].logits):
            assert torch.equal(a, b)
        assert cached_step["targets"].features.keys() == online_step["targets"].features.keys()
        for key, value in cached_step["targets"].features.items():
            assert torch.equal(value, online_step["targets"].features[key]), key
            stored = cached(forms_cache / "train.h5", form_dataset(key.layer, key.form), cached_step["pairs"]).float()
            assert torch.equal(value, stored), key


def test_ce_augmentation_draws_fresh_views_each_epoch_the_same_whatever_the_worker_count(data_cfg, cache_dir, tmp_path):
    from logitcache.core.views import RandomViews, render_batch

    aug = {"crop_padding": 2, "flip": True, "policy": []}
    params = student_params(data_cfg, cache_dir, tmp_path, loss={}, augment=aug, epochs=2)
    cfg = params.students["s"]
    plan = plan_run(params, cfg, "s")
    dataset, sampler = make_batches(cfg, plan)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        pairs = next(iter(sampler))
        rows, views = pairs[:, 0], pairs[:, 1]
        images = dataset[pairs].images
        drawn = RandomViews(ViewSpec(2, True), cfg.seed)[rows, views]
        assert torch.equal(images, torch.stack([ViewRenderer(ViewSpec(2, True))(plan.train.images[r], p)
                                                for r, p in zip(rows, drawn)]))
        assert torch.equal(images, render_batch(ViewRenderer(ViewSpec(2, True)), plan.train.images[rows], drawn))
        epochs.append(dict(zip(rows.tolist(), map(tuple, drawn.tolist()))))
    both = epochs[0].keys() & epochs[1].keys()
    assert sum(epochs[0][r] != epochs[1][r] for r in both) > len(both) // 2  # a row's view changes with the epoch
    weights = []
    for workers in (0, 1):
        out = tmp_path / f"workers{workers}"
        train_student(student_params(data_cfg, cache_dir, out, loss={}, augment=aug, epochs=2, workers=workers), "s")
        weights.append(torch.load(out / "student" / "student.pt", weights_only=True)["state_dict"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
