"""One registry per kind of thing: a data set, a stored form or a runtime registered in one place works end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.core.config import validate
from logitcache.core.data import DATASETS, DatasetSpec, load_split, prepare_data
from logitcache.core.errors import LogitcacheError


def _stripes(cfg, source: str, split: str):
    """A tiny 2-class data set made here: horizontal stripes against vertical stripes, 8x8, one channel."""
    n = 80 if split == "train" else 40
    labels = np.arange(n) % 2
    images = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    images[labels == 0, :, ::2, :] = 255
    images[labels == 1, :, :, ::2] = 255
    return images, labels, ["horizontal", "vertical"]


def test_a_data_set_registered_in_one_place_is_valid_config_and_trains_a_student(tmp_path, monkeypatch):
    with pytest.raises(LogitcacheError, match="unknown data set 'stripes'"):
        validate({"data": {"dataset": "stripes"}})
    monkeypatch.setitem(DATASETS, "stripes", DatasetSpec(1, 2, (0.25,), (0.43,), str(tmp_path), _stripes))
    data = {"dataset": "stripes", "root": str(tmp_path / "prepared"), "validation": 10}
    params = validate({"data": data, "students": {"s": {
        "model": "cnn_tiny", "loss": {}, "steps": 4, "batch_size": 16, "workers": 0, "test_cache": None,
        "out": str(tmp_path / "student")}}})
    prepare_data(params.data)
    train = load_split(params.data, "train")
    images, labels, _ = _stripes(None, "", "train")
    assert torch.equal(train.images, torch.from_numpy(images)) and train.labels.tolist() == labels.tolist()
    from logitcache.student.train import train_student

    metrics = train_student(params, "s")
    assert metrics["steps"] == 4 and (tmp_path / "student" / "student.pt").is_file()


def test_a_stored_form_registered_in_one_place_is_dumped_read_and_verified(data_cfg, teacher_ckpt, tmp_path,
                                                                          monkeypatch):
    """A new form, the per-channel maximum of a map: config accepts it, the dump stores it, the reader lists it and
    inspect --verify recomputes it; its rows equal the formula applied here to the teacher's own layer."""
    import h5py
    from torchvision.models.feature_extraction import create_feature_extractor

    from logitcache.core.forms import FORMS, StoredForm
    from logitcache.cache.inspect import verify
    from logitcache.cache.reader import Cache
    from logitcache.core.io import load_model
    from logitcache.core.views import Normalizer
    from logitcache.teacher.dump import dump_teacher

    layers = [{"name": "layer2", "forms": ["map", "channel_max"]}]
    dump = {"teacher": str(teacher_ckpt), "out": str(tmp_path / "cache"), "views": 1, "layers": layers,
            "workers": 0, "splits": ["train"]}
    with pytest.raises(LogitcacheError, match="unknown stored form 'channel_max'"):
        validate({"data": data_cfg.model_dump(), "dump": dump})
    monkeypatch.setitem(FORMS, "channel_max", StoredForm("channel_max", (), lambda spec: {},
                                                         lambda t, record: t.amax(dim=(2, 3))))
    [path] = dump_teacher(validate({"data": data_cfg.model_dump(), "dump": dump}))
    with Cache(path) as cache:
        assert cache.stored[("layer2", "channel_max")] == (32,)
    model, _ = load_model(teacher_ckpt)
    train = load_split(data_cfg, "train")
    with torch.no_grad():
        layer2 = create_feature_extractor(model.eval(), {"layer2": "out"})(Normalizer(train.mean, train.std)(
            train.images[:50]))["out"]
    with h5py.File(path, "r") as f:
        stored = torch.from_numpy(f["channel_max/layer2"][:50, 0])
    assert torch.allclose(stored.float(), layer2.amax(dim=(2, 3)).half().float(), atol=2e-3, rtol=2e-3)
    assert verify(path, teacher_ckpt, data_cfg, samples=16)["cosine"]["layer2:channel_max"] > 0.999


def _traced(job):
    """A runtime made in the test: the model traced to TorchScript, saved in the export folder and loaded back."""
    path = job.folder / "model.ts"
    torch.jit.save(torch.jit.trace(job.model.eval(), job.example), str(path))
    from logitcache.core.speed import torch_runtime

    return torch_runtime(torch.jit.load(str(path)))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # TorchScript: deprecated, a runtime only this test makes
def test_a_runtime_registered_in_one_place_is_exported_checked_timed_and_shown(data_cfg, cache_dir, tmp_path,
                                                                              monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    from logitcache.core.runtimes import RUNTIMES, RuntimeSpec
    from logitcache.deploy.export import export_checkpoint
    from logitcache.student.train import train_student
    from logitcache.summary import summarize

    monkeypatch.setitem(RUNTIMES, "torchscript", RuntimeSpec("TorchScript trace", "ts", "model.ts", _traced, "exact"))
    params = validate({"data": data_cfg.model_dump(), "teacher": {"out": str(tmp_path / "s")},
                       "students": {"s": {"model": "cnn_tiny", "steps": 4, "batch_size": 32, "workers": 0,
                                          "caches": [str(cache_dir / "train.h5")],
                                          "test_cache": str(cache_dir / "test.h5"), "out": str(tmp_path / "s")}},
                       "export": {"out": str(tmp_path / "deploy"), "calibration_images": 32, "latency_runs": 3,
                                  "warmup_runs": 1, "throughput_runs": 1,
                                  "calibration_cache": str(cache_dir / "train.h5")}})
    train_student(params, "s")
    metrics = export_checkpoint(params, tmp_path / "s" / "student.pt", "s")
    traced = metrics["torchscript"]
    assert traced["bytes"] == (tmp_path / "deploy" / "s" / "model.ts").stat().st_size > 0
    assert traced["max_abs_logit_diff"] <= 1e-4 and traced["test_acc"] == metrics["pytorch"]["test_acc"]
    assert traced["latency_ms"] > 0 and traced["throughput_img_s"] > 0
    table = (summarize(params, tmp_path / "summary"), (tmp_path / "summary" / "summary.md").read_text())[1]
    assert "batch-1 ms: eager / onnx / int8 / ts |" in table and f"{traced['latency_ms']:.3f} |" in table
    spec = importlib.util.spec_from_file_location("deployment", Path(__file__).parents[1] / "benchmarks/deployment.py")
    deployment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deployment)
    saved = json.loads((tmp_path / "deploy" / "s" / "metrics.json").read_text())
    assert any("| TorchScript trace | `model.ts` |" in line for line in deployment.runtime_table({"s": saved}))
