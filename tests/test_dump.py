import json
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torchvision.models.feature_extraction import create_feature_extractor

from logitcache.cache.format import form_dataset, open_cache
from logitcache.cache.reader import Cache
from logitcache.cli import main
from logitcache.core.config import validate
from logitcache.core.data import load_split
from logitcache.core.errors import LogitcacheError
from logitcache.core.features import FeatureExtractor, load_teacher, stored_form
from logitcache.core.views import Normalizer, ViewRenderer, ViewSpec
from logitcache.teacher.dump import dump_teacher


def dump_params(data_cfg, teacher_ckpt, out, **dump):
    settings = {"teacher": str(teacher_ckpt), "out": str(out), "views": 3, "layers": ["layer2"],
                "feature_pool": 2, "batch_size": 96, "workers": 0, "splits": ["train"], **dump}
    return validate({"data": data_cfg.model_dump(), "dump": settings})


FORMS = [{"name": "layer1", "forms": ["attention", "embedding"], "p": 3},
         {"name": "layer2", "forms": ["map", "attention", "embedding"]}]


def _forms_float64(feature: torch.Tensor, pool: int, p: float) -> dict[str, np.ndarray]:
    """The three stored forms of one layer's output, written out in float64 and rounded to float16 as stored."""
    f = feature.double()
    n, c, h, w = f.shape
    blocks = f.reshape(n, c, pool, h // pool, pool, w // pool)  # the maps here divide evenly: plain block means
    attention = f.abs().pow(p).mean(dim=1).reshape(n, h * w)
    forms = {"map": blocks.mean(dim=(3, 5)), "attention": attention / attention.norm(dim=1, keepdim=True),
             "embedding": f.mean(dim=(2, 3))}
    return {form: value.numpy().astype(np.float16) for form, value in forms.items()}


def _within_one_float16_step(stored: np.ndarray, expected: np.ndarray) -> bool:
    """Equal up to the rounding of the last float16 step (the test's float64 path may round the other way)."""
    gap = np.abs(stored.astype(np.float64) - expected.astype(np.float64))
    return bool((gap <= np.spacing(np.abs(expected)).astype(np.float64)).all())


def test_round_trip_rows_equal_independently_recomputed_teacher_outputs(data_cfg, teacher_ckpt, tmp_path):
    params = dump_params(data_cfg, teacher_ckpt, tmp_path, layers=FORMS)
    [path] = dump_teacher(params)
    f, meta = open_cache(path)
    assert meta["views"]["count"] == 3 and meta["dataset"]["count"] == 600
    assert meta["layers"] == [
        {"name": "layer1", "activation": "after",
         "forms": {"attention": {"shape": [784], "p": 3.0}, "embedding": {"shape": [16]}}},
        {"name": "layer2", "activation": "after",
         "forms": {"map": {"shape": [32, 2, 2], "pooled_to": 2}, "attention": {"shape": [196], "p": 2.0},
                   "embedding": {"shape": [32]}}}]
    assert f["logits"].dtype == np.float16 and f["logits"].fletcher32 and f["logits"].chunks[1:] == (3, 10)
    assert {name: (f[name].shape, f[name].dtype) for name in ("attention/layer1", "embedding/layer1", "features/layer2",
                                                               "attention/layer2", "embedding/layer2")} == {
        "attention/layer1": ((600, 3, 784), np.float16), "embedding/layer1": ((600, 3, 16), np.float16),
        "features/layer2": ((600, 3, 32, 2, 2), np.float16), "attention/layer2": ((600, 3, 196), np.float16),
        "embedding/layer2": ((600, 3, 32), np.float16)}
    assert "features/layer1" not in f  # only the forms asked for
    split = load_split(data_cfg, "train")
    teacher = load_teacher(teacher_ckpt)
    rows = np.array([0, 17, 599])
    with Cache(path) as cache:
        view_table = cache.view_params()
    render = ViewRenderer(ViewSpec(2, True))
    images = torch.stack([render(split.images[i], p) for i in rows for p in view_table[i]])
    extractor = create_feature_extractor(teacher.model.eval(), {"layer1": "layer1", "layer2": "layer2", "fc": "logits"})
    with torch.inference_mode():
        out = extractor(Normalizer(split.mean, split.std)(images))
    assert np.allclose(f["logits"][rows], out["logits"].reshape(3, 3, 10).numpy(), atol=2e-2, rtol=2e-3)
    for layer, pool, p in (("layer1", 1, 3.0), ("layer2", 2, 2.0)):
        expected = _forms_float64(out[layer], pool, p)
        for form in meta["layers"][0 if layer == "layer1" else 1]["forms"]:
            stored = f[{"map": "features", "attention": "attention", "embedding": "embedding"}[form] + "/" + layer][rows]
            assert _within_one_float16_step(stored, expected[form].reshape(stored.shape)), (layer, form)
    assert np.array_equal(f["index"][:], np.arange(600))
    assert np.array_equal(f["labels"][:], split.labels.numpy())
    f.close()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of logits rounded to float16 as the cache stores them (the same ties, the same argmax)."""
    return (logits.half().argmax(-1) == labels).double().mean().item()


@pytest.mark.slow
def test_recorded_teacher_accuracy_equals_a_forward_pass_over_every_row(data_cfg, teacher_ckpt, tmp_path):
    [path] = dump_teacher(dump_params(data_cfg, teacher_ckpt, tmp_path, layers=[]))
    with Cache(path) as cache:
        recorded, eval_view, vp = cache.meta["teacher_accuracy"], cache.meta["views"]["eval_view"], cache.view_params()
    split = load_split(data_cfg, "train")
    model, prepare = load_teacher(teacher_ckpt).model.eval(), Normalizer(split.mean, split.std)
    render = ViewRenderer(ViewSpec(2, True))
    views = torch.stack([torch.stack([render(split.images[i], p) for p in vp[i]]) for i in range(600)])
    with torch.inference_mode():
        plain = model(prepare(split.images))  # the evaluation view is the image itself
        every = model(prepare(views.flatten(0, 1))).reshape(600, 3, 10)
    assert eval_view == 0
    assert recorded["eval_view"] == _accuracy(plain, split.labels)
    assert recorded["all_views"] == _accuracy(every, split.labels[:, None])
    assert 0.3 < recorded["eval_view"] < 1  # a trained teacher, not a constant: the comparison above means something


def test_every_stored_form_is_what_stored_form_returns_to_the_bit(data_cfg, teacher_ckpt, tmp_path, monkeypatch):
    """--online and inspect --verify recompute rows with `stored_form`: the dump must have written exactly that."""
    seen = []
    original = FeatureExtractor.forward
    monkeypatch.setattr(FeatureExtractor, "forward", lambda self, x: seen.append(original(self, x)) or seen[-1])
    [path] = dump_teacher(dump_params(data_cfg, teacher_ckpt, tmp_path, layers=FORMS, views=2))
    with Cache(path) as cache:
        for layer, record in cache.layers.items():
            for form in record["forms"]:
                fresh = torch.cat([stored_form(out[layer].float(), form, record) for out in seen[1:]])
                stored = torch.from_numpy(cache.read(form_dataset(layer, form)))
                assert torch.equal(stored.flatten(0, 1), fresh), (layer, form)


@pytest.mark.slow
def test_replayed_view_is_bit_identical_to_the_dumped_input(data_cfg, teacher_ckpt, tmp_path, monkeypatch):
    seen = []
    original = FeatureExtractor.forward
    monkeypatch.setattr(FeatureExtractor, "forward", lambda self, x: seen.append(x.clone()) or original(self, x))
    params = dump_params(data_cfg, teacher_ckpt, tmp_path, layers=[],
                         augment={"crop_padding": 2, "flip": True, "policy": [{"name": "ColorJitter", "brightness": 0.5}]})
    [path] = dump_teacher(params)
    dumped = torch.cat(seen[1:])  # seen[0] is the shape probe
    split = load_split(data_cfg, "train")
    with Cache(path) as cache:
        spec = ViewSpec(2, True, ({"name": "ColorJitter", "brightness": 0.5},))
        vp = cache.view_params()
    render = ViewRenderer(spec)
    replay = torch.stack([render(split.images[i], vp[i, v]) for i in range(600) for v in range(3)])
    assert torch.equal(Normalizer(split.mean, split.std)(replay), dumped)


def test_existing_cache_is_not_overwritten(data_cfg, teacher_ckpt, tmp_path):
    params = dump_params(data_cfg, teacher_ckpt, tmp_path, views=1, layers=[])
    [path] = dump_teacher(params)
    before = path.stat().st_mtime_ns
    with pytest.raises(LogitcacheError, match="already exists; pass --overwrite"):
        dump_teacher(params)
    assert path.stat().st_mtime_ns == before
    again = dump_params(data_cfg, teacher_ckpt, tmp_path, views=1, layers=[], overwrite=True)
    dump_teacher(again)


def test_unknown_layer_lists_valid_names(data_cfg, teacher_ckpt, tmp_path):
    with pytest.raises(LogitcacheError, match=r"unknown layer\(s\) layer9; valid names: .*layer2"):
        dump_teacher(dump_params(data_cfg, teacher_ckpt, tmp_path, layers=["layer9"]))
    assert not list(tmp_path.glob("*.h5*"))


def _broken_teacher(teacher_ckpt, tmp_path, value):
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    ckpt["state_dict"]["fc.bias"][3] = value
    path = tmp_path / "broken.pt"
    torch.save(ckpt, path)
    return path


def test_non_finite_outputs_stop_the_run_naming_samples(data_cfg, teacher_ckpt, tmp_path):
    broken = _broken_teacher(teacher_ckpt, tmp_path, float("nan"))
    with pytest.raises(LogitcacheError, match=r"non-finite logits for sample\(s\) \[0, 1, 2"):
        dump_teacher(dump_params(data_cfg, broken, tmp_path))
    assert not (tmp_path / "train.h5").exists()


def test_float16_overflow_is_detected(data_cfg, teacher_ckpt, tmp_path):
    broken = _broken_teacher(teacher_ckpt, tmp_path, 1e6)
    with pytest.raises(LogitcacheError, match="overflow float16; set dump.logits_dtype=float32"):
        dump_teacher(dump_params(data_cfg, broken, tmp_path))
    [path] = dump_teacher(dump_params(data_cfg, broken, tmp_path / "f32", logits_dtype="float32"))
    with Cache(path) as cache:
        assert cache.logits().max() > 1e5


def test_reader_refuses_a_file_without_complete_flag(data_cfg, teacher_ckpt, tmp_path):
    [path] = dump_teacher(dump_params(data_cfg, teacher_ckpt, tmp_path, views=1, layers=[]))
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = "false"
    with pytest.raises(LogitcacheError, match="incomplete"):
        Cache(path)
    with h5py.File(path, "r+") as f:
        del f.attrs["complete"]
    with pytest.raises(LogitcacheError, match="'complete' is missing"):
        Cache(path)


@pytest.mark.slow
def test_topk_cache_reconstructs_probabilities_at_t1(data_cfg, teacher_ckpt, tmp_path):
    # float32 logits: in float16 the two largest logits of a row can round to a tie, which argmax and topk
    # break differently, so the teacher accuracies of the two caches could differ by a row or two
    full = Cache(dump_teacher(dump_params(data_cfg, teacher_ckpt, tmp_path / "full", layers=[],
                                          logits_dtype="float32"))[0])
    top = Cache(dump_teacher(dump_params(data_cfg, teacher_ckpt, tmp_path / "top", layers=[], topk=3,
                                         logits_dtype="float32"))[0])
    p_full = full.logits().softmax(-1)
    p_top = top.logits().softmax(-1)
    idx = torch.from_numpy(top.read("topk_indices")).long()
    assert torch.allclose(p_top.gather(-1, idx), p_full.gather(-1, idx), atol=1e-6)
    # the leftover mass 1 - sum(top-k probabilities) is spread evenly over the other classes, in float64
    exact = full.logits().double().softmax(-1)
    left = 1 - exact.gather(-1, idx).sum(-1, keepdim=True)
    others = torch.ones_like(exact, dtype=torch.bool).scatter_(-1, idx, False)
    expected = torch.where(others, left / (10 - 3), exact)
    assert torch.allclose(p_top.double(), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(exact, expected, atol=5e-3)  # the even spread does differ from the full distribution
    spread = p_top.double()[others].reshape(600, 3, 7)
    assert torch.equal(spread, spread[..., :1].expand_as(spread))  # exactly even in the reconstruction
    assert top.meta["teacher_accuracy"] == full.meta["teacher_accuracy"]
    with pytest.raises(LogitcacheError, match="topk=10 must be below"):
        dump_teacher(dump_params(data_cfg, teacher_ckpt, tmp_path / "bad", topk=10))


@pytest.mark.slow
def test_views_all_enumerates_fifty(data_cfg, teacher_ckpt, tmp_path):
    params = validate({"data": data_cfg.model_dump(), "dump": {"teacher": str(teacher_ckpt), "out": str(tmp_path),
                       "views": "all", "workers": 0, "splits": ["train"], "batch_size": 500}})
    [path] = dump_teacher(params)
    with Cache(path) as cache:
        assert cache.num_views == 50 and cache.meta["views"]["mode"] == "all"
        assert len({tuple(p) for p in cache.view_params()[5]}) == 50


@pytest.mark.slow
def test_inspect_shows_every_form_and_verify_recomputes_each(data_cfg, teacher_ckpt, tmp_path):
    params = dump_params(data_cfg, teacher_ckpt, tmp_path, layers=FORMS)
    [path] = dump_teacher(params)
    runner = CliRunner()
    plain = runner.invoke(main, ["inspect", str(path)])
    assert plain.exit_code == 0, plain.output
    assert "resnet8" in plain.output and "complete" in plain.output and "bytes/sample" in plain.output
    # 3 views x float16: attention 784 -> 4,704 bytes a sample; embedding 16 -> 96; map 32x2x2 -> 768
    for layer, form, dataset, shape, size, setting in (
            ("layer1", "attention", "attention/layer1", "(784,)", "4,704", "p=3"),
            ("layer1", "embedding", "embedding/layer1", "(16,)", "96", ""),
            ("layer2", "map", "features/layer2", "(32, 2, 2)", "768", "pooled to 2"),
            ("layer2", "attention", "attention/layer2", "(196,)", "1,176", "p=2"),
            ("layer2", "embedding", "embedding/layer2", "(32,)", "192", "")):
        line = rf"^  {layer}\s+{form}\s+{dataset}\s+{re.escape(shape)}\s+{size}\s*{setting}$"
        assert re.search(line, plain.output, re.MULTILINE), (line, plain.output)
    assert re.search(r"^  views/code\s+\(600, 3\)\s+uint8\s+3 B/sample$", plain.output, re.MULTILINE), plain.output
    data_args = ["-S", f"data.root={data_cfg.root}", "-S", "data.train_limit=600", "-S", "data.test_limit=300", "-S", "data.validation=60"]
    ok = runner.invoke(main, ["inspect", str(path), "--verify", "--teacher", str(teacher_ckpt), *data_args, "--json"])
    assert ok.exit_code == 0, ok.output
    assert set(json.loads(ok.output)["verify"]["cosine"]) == {"layer1:attention", "layer1:embedding", "layer2:map",
                                                               "layer2:attention", "layer2:embedding"}
    with h5py.File(path, "r+") as f:  # tamper with one form's rows, keeping checksums valid
        f["attention/layer1"][:] = np.flip(f["attention/layer1"][:], axis=-1)
    bad = runner.invoke(main, ["inspect", str(path), "--verify", "--teacher", str(teacher_ckpt), *data_args])
    assert bad.exit_code == 2 and "does not match its teacher: layer1:attention cosine" in bad.output
    with h5py.File(path, "r+") as f:
        f["logits"][:] = f["logits"][:] + np.float16(1.0)
    bad = runner.invoke(main, ["inspect", str(path), "--verify", "--teacher", str(teacher_ckpt), *data_args])
    assert bad.exit_code == 2 and "does not match its teacher: max |Δlogit|" in bad.output


def test_a_version_1_cache_is_refused_with_a_redump_message(cache_dir, tmp_path):
    path = tmp_path / "train.h5"
    shutil.copy(cache_dir / "train.h5", path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = "1"
    with pytest.raises(LogitcacheError) as e:
        Cache(path)
    message = str(e.value)
    assert "\n" not in message and "cache schema version 1, this logitcache reads 2 (since version 2, layers are " \
        "stored in chosen forms (map, attention, embedding) and views as one small crop/flip code each); " \
        "re-dump it with logitcache" in message
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2 and "cache schema version 1" in result.output


def _content(path):
    with h5py.File(path, "r") as f:
        arrays = {}
        f.visititems(lambda n, o: arrays.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        return dict(f.attrs), arrays


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_identical_content(data_cfg, teacher_ckpt, tmp_path):
    args = [sys.executable, "-m", "logitcache", "dump-teacher", "-S", f"data.root={data_cfg.root}",
            "-S", "data.train_limit=600", "-S", "data.test_limit=300", "-S", "data.validation=60", "-S", "dump.splits=[train]",
            "-S", "dump.views=8", "-S", "dump.layers=[layer1]", "-S", "dump.feature_pool=0",
            "-S", "dump.batch_size=64", "-S", "dump.workers=0", "--teacher", str(teacher_ckpt)]
    reference = tmp_path / "reference"
    _ok(subprocess.run([*args, "--out", str(reference)], capture_output=True, text=True))
    partial = tmp_path / "killed" / "train.h5.partial"
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size > 2_000_000):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "train.h5").exists(), "the run finished before it was killed"
    with h5py.File(partial, "r") as f:
        done = int(f.attrs["rows_done"])
    assert 0 < done < 600
    rerun = subprocess.run([*args, "--out", str(tmp_path / "killed")], capture_output=True, text=True)
    _ok(rerun)
    assert f"{partial}: resuming at row {done:,} of 600" in rerun.stdout  # resumed, not started over
    assert not partial.exists()
    attrs_a, arrays_a = _content(reference / "train.h5")
    attrs_b, arrays_b = _content(tmp_path / "killed" / "train.h5")
    assert attrs_a == attrs_b
    assert arrays_a.keys() == arrays_b.keys()
    assert all(np.array_equal(arrays_a[k], arrays_b[k]) for k in arrays_a)
