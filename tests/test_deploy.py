"""Deployment: export (ONNX, .pt2, int8 ONNX), structured pruning, and distilling a pruned model from the cache."""

import hashlib
import json

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.core.config import validate
from logitcache.core.data import load_split
from logitcache.core.io import load_model
from logitcache.core.models import build_model, layer_channels, resize_layers
from logitcache.core.provenance import environment
from logitcache.core.views import Normalizer
from logitcache.deploy.prune import prune_model
from logitcache.student.train import train_student


@pytest.fixture(scope="module")
def student_ckpt(data_cfg, cache_dir, shared_folder):
    """A cnn_tiny KD student, 2 epochs on the 600-sample slice."""
    out = shared_folder("deploy_student", lambda out: train_student(_params(data_cfg, cache_dir, out, {}), "s"))
    return out / "student.pt"


def _params(data_cfg, cache_dir, out, export=None, prune=None, **student):
    return validate({"data": data_cfg.model_dump(), "students": {"s": {
        "model": "cnn_tiny", "epochs": 2, "batch_size": 64, "workers": 0, "caches": [str(cache_dir / "train.h5")],
        "test_cache": str(cache_dir / "test.h5"), "out": str(out), **student}},
        "export": {"out": str(out / "deploy"), "calibration_cache": str(cache_dir / "train.h5"),
                   "calibration_images": 64, "latency_runs": 5, "warmup_runs": 1, "throughput_runs": 1,
                   **(export or {})},
        "prune": prune or {}})


def _test_inputs(data_cfg):
    test = load_split(data_cfg, "test")
    return Normalizer(test.mean, test.std)(test.images), test.labels


@pytest.mark.slow
def test_export_matches_pytorch_and_reports_int8(data_cfg, cache_dir, student_ckpt, tmp_path):
    from logitcache.deploy.export import export_checkpoint

    metrics = export_checkpoint(_params(data_cfg, cache_dir, tmp_path), student_ckpt, "kd")
    folder = tmp_path / "deploy" / "kd"
    assert sorted(p.name for p in folder.iterdir()) == [".logitcache-outputs.json", "metrics.json", "model.int8.onnx",
                                                        "model.onnx", "model.pt2"]
    images, labels = _test_inputs(data_cfg)
    model, _ = load_model(student_ckpt)
    with torch.no_grad():
        reference = model.eval()(images)

    fp32 = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(fp32.run(None, {"images": images.numpy()})[0])
    program = torch.export.load(folder / "model.pt2").module()
    with torch.no_grad():
        pt2_logits = program(images)
    for logits in (onnx_logits, pt2_logits):
        assert torch.equal(logits.argmax(1), reference.argmax(1))
        assert (logits - reference).abs().max().item() <= 1e-4
    graph = onnx.load(folder / "model.onnx")
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named (dynamic) batch axis
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == metrics["opset"] == 18

    int8 = ort.InferenceSession(str(folder / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    int8_acc = (int8.run(None, {"images": images.numpy()})[0].argmax(1) == labels.numpy()).mean()
    fp32_acc = (reference.argmax(1) == labels).double().mean().item()
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(folder / "model.int8.onnx").graph.node)
    assert metrics["int8_method"] == "static"
    assert metrics["pytorch"]["test_acc"] == fp32_acc and metrics["onnx_int8"]["test_acc"] == int8_acc
    assert metrics["onnx_int8"]["acc_drop"] == pytest.approx(fp32_acc - int8_acc, abs=1e-12)
    assert metrics["params"] == 9640 and metrics["onnx_int8"]["bytes"] == (folder / "model.int8.onnx").stat().st_size
    for key in ("pytorch", "onnx_fp32", "onnx_int8"):
        assert 0 < metrics[key]["latency_ms"] <= metrics[key]["latency_p90_ms"]
    assert metrics["environment"] == environment().as_dict()
    assert json.loads((folder / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_export_beyond_tolerance_fails_and_writes_nothing(data_cfg, cache_dir, student_ckpt, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(_params(data_cfg, cache_dir, tmp_path).model_dump(mode="json")))
    result = CliRunner().invoke(main, ["export", str(student_ckpt), "--params", str(params), "--atol", "1e-30"])
    assert result.exit_code == 2 and result.output.startswith("error: cnn_tiny ONNX Runtime fp32 export differs from PyTorch")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "deploy").exists() or not any((tmp_path / "deploy").iterdir())


def test_bad_input_is_one_line_and_leaves_no_file(data_cfg, cache_dir, student_ckpt, tmp_path):
    cases = [["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "e")],
             ["prune", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "p.pt")],
             ["prune", str(student_ckpt), "--ratio", "1", "--out", str(tmp_path / "p.pt")],
             ["prune", str(student_ckpt), "--ratio", "0", "--out", str(tmp_path / "p.pt")]]
    for args in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_exporter_failure_names_the_model(monkeypatch, tmp_path):
    from logitcache.deploy import export

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::fancy\nmore detail")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(export.LogitcacheError, match=r"^model cnn_tiny cannot be exported with torch.export: "
                                                      r"Unsupported operator aten::fancy$"):
        export.export_program(build_model("cnn_tiny", 1, 10), torch.zeros(2, 1, 28, 28), tmp_path / "m.pt2", "cnn_tiny")


def test_pruned_model_rebuilds_from_plain_data():
    torch.manual_seed(0)
    model = build_model("resnet8", 1, 10).eval()
    x = torch.randn(3, 1, 28, 28)
    prune_model(model, x[:2], 0.4, {"model": "resnet8", "num_classes": 10})
    assert model.conv1.out_channels < 16 and model.fc.out_features == 10
    rebuilt = resize_layers(build_model("resnet8", 1, 10), layer_channels(model), model.state_dict())
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


def test_prune_cli_writes_a_smaller_checkpoint_loadable_without_pickle(data_cfg, cache_dir, teacher_ckpt, tmp_path):
    out = tmp_path / "pruned" / "teacher.pt"
    result = CliRunner().invoke(main, ["prune", str(teacher_ckpt), "--ratio", "0.4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out, weights_only=True)
    assert all(isinstance(v, int) for layer in ckpt["model_info"]["channels"].values() for v in layer.values())
    model, _ = load_model(out)
    teacher, _ = load_model(teacher_ckpt)
    n = sum(p.numel() for p in model.parameters())
    assert n <= 0.4 * sum(p.numel() for p in teacher.parameters())
    images, labels = _test_inputs(data_cfg)
    with torch.no_grad():
        acc = (model.eval()(images).argmax(1) == labels).double().mean().item()
    metrics = json.loads((out.parent / "metrics.json").read_text())
    assert metrics["params"] == n and metrics["test_acc"] == acc


@pytest.mark.slow
def test_student_starts_from_a_pruned_checkpoint(data_cfg, cache_dir, teacher_ckpt, tmp_path):
    from logitcache.deploy.prune import prune_checkpoint

    pruned = tmp_path / "pruned.pt"
    prune_checkpoint(_params(data_cfg, cache_dir, tmp_path, prune={"out": str(pruned)}), teacher_ckpt)
    start, _ = load_model(pruned)
    params = _params(data_cfg, cache_dir, tmp_path / "s", model="resnet8", init=str(pruned), epochs=1, lr=1e-9,
                     momentum=0.0, weight_decay=0.0)
    train_student(params, "s")
    trained, ckpt = load_model(tmp_path / "s" / "student.pt")
    assert ckpt["model_info"]["channels"] == layer_channels(start)
    assert sum(p.numel() for p in trained.parameters()) == sum(p.numel() for p in start.parameters())
    assert torch.allclose(trained.conv1.weight, start.conv1.weight, atol=1e-6)  # lr ~ 0: the init weights
    assert not torch.allclose(build_model("resnet8", 1, 10).conv1.weight[: start.conv1.out_channels],
                              start.conv1.weight, atol=1e-3)


def test_init_of_another_model_is_refused(data_cfg, cache_dir, teacher_ckpt, tmp_path):
    from logitcache.core.errors import LogitcacheError

    params = _params(data_cfg, cache_dir, tmp_path, init=str(teacher_ckpt))
    with pytest.raises(LogitcacheError, match="init checkpoint .* holds resnet8 .* set model: resnet8"):
        train_student(params, "s")
    assert not (tmp_path / "student.pt").exists()


def test_summary_shows_an_exported_models_size_and_latency_per_runtime(tmp_path):
    from logitcache.summary import summarize

    origin = {"teacher_sha256": None, "caches": {}, "data_fingerprint": None}
    for folder, metrics in {"t": {"test_acc": 0.9, "params": 77754, "latency_ms": 0.5},
                            "k": {"test_acc": 0.8, "params": 9640, "latency_ms": 0.28, **origin}}.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "k" / "student.pt").write_bytes(b"weights")
    (tmp_path / "deploy" / "kd").mkdir(parents=True)
    (tmp_path / "deploy" / "kd" / "metrics.json").write_text(json.dumps({
        "checkpoint_sha256": hashlib.sha256(b"weights").hexdigest(), "pytorch": {"latency_ms": 0.3}, "onnx_fp32": {"bytes": 40960, "latency_ms": 0.1},
        "onnx_int8": {"bytes": 20480, "acc_drop": 0.003, "latency_ms": 0.08}}))
    params = validate({"teacher": {"out": str(tmp_path / "t")}, "export": {"out": str(tmp_path / "deploy")},
                       "students": {"kd": {"model": "cnn_tiny", "epochs": 1, "out": str(tmp_path / "k")}}})
    flat = summarize(params, tmp_path / "summary")
    assert flat["kd"]["onnx_bytes"] == 40960 and flat["kd"]["int8_latency_ms"] == 0.08 and "onnx_bytes" not in flat["teacher"]
    table = (tmp_path / "summary" / "summary.md").read_text()
    assert "| – / 40.0 / 20.0 | 0.30 | 0.300 / 0.100 / 0.080 |" in table  # the export's figures, not the run's 0.28
    assert "0.28" not in table and "| – | – | 0.500 / – / – |" in table  # a model not exported: its run's latency


def test_a_pruning_ratio_that_empties_every_layer_asks_for_a_smaller_ratio():
    from logitcache.core.errors import LogitcacheError

    with pytest.raises(LogitcacheError, match=r"ratio 0.999 removes no channel of resnet8 .*; give a smaller ratio$"):
        prune_model(build_model("resnet8", 1, 10), torch.randn(2, 1, 28, 28), 0.999,
                    {"model": "resnet8", "num_classes": 10})
