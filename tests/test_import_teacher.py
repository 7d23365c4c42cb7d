"""Bring your own teacher: import-teacher from local weight files (torchvision, timm, logitcache's own models),
the teacher's preprocessing in the cache, class maps, fine-tuning, timm students. Every weight file is made here."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import save_file
from torchvision.transforms import v2

from logitcache.cli import main
from logitcache.core.config import validate
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import load_checkpoint
from logitcache.core.models import build_model, feature_nodes
from logitcache.core.preprocess import Preprocess, TeacherInput
from logitcache.teacher.dump import dump_teacher
from logitcache.teacher.importer import import_teacher
from logitcache.teacher.train import train_teacher


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def params_for(data_cfg, tmp_path: Path, model: str, validation: int | None = None, **teacher):
    data = {**data_cfg.model_dump(), **({} if validation is None else {"validation": validation})}
    return validate({"data": data, "teacher": {"model": model, "out": str(tmp_path / "imported"), "workers": 0,
                                               **teacher}})


def dump(data_cfg, teacher: Path, out: Path, **dump_cfg) -> Path:
    cfg = {"teacher": str(teacher), "out": str(out), "views": 2, "layers": ["layer2"], "feature_pool": 2,
           "workers": 0, **dump_cfg}
    dump_teacher(validate({"data": data_cfg.model_dump(), "dump": cfg}))
    return out


def arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return {name: f[name][()] for name in names}


def cache_meta(path: Path) -> dict:
    with h5py.File(path) as f:
        return {k: json.loads(v) for k, v in f.attrs.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resnet18_file(tmp_path: Path, classes: int, name: str = "r18.pth") -> Path:
    torch.manual_seed(0)
    path = tmp_path / name
    torch.save(torchvision.models.resnet18(num_classes=classes).state_dict(), path)
    return path


def by_hand(images: torch.Tensor, resize: int, crop: int, mean, std) -> torch.Tensor:
    """The teacher's input as torchvision's own transforms make it: Grayscale(3), Resize, CenterCrop, scale, Normalize."""
    t = v2.Compose([v2.Grayscale(3), v2.Resize(resize, antialias=True), v2.CenterCrop(crop),
                    v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    return t(images)


# ---------------------------------------------------------------- round trip of a logitcache teacher


@pytest.mark.slow
def test_a_trained_teacher_saved_as_state_dict_or_safetensors_imports_to_the_same_cache(data_cfg, teacher_ckpt,
                                                                                        tmp_path):
    original = load_checkpoint(teacher_ckpt)
    plain, safe = tmp_path / "state.pt", tmp_path / "state.safetensors"
    torch.save(original["state_dict"], plain)
    save_file({k: v.contiguous() for k, v in original["state_dict"].items()}, safe)
    reference = dump(data_cfg, teacher_ckpt, tmp_path / "cache_original")
    for weights in (plain, safe):
        params = params_for(data_cfg, tmp_path / weights.suffix[1:], "resnet8")
        import_teacher(params, weights)
        imported = Path(params.teacher.out) / "teacher.pt"
        ckpt = load_checkpoint(imported)
        assert ckpt["model_info"]["source"]["sha256"] == sha256(weights)
        model, twin = build_model("resnet8", 1, 10).eval(), build_model("resnet8", 1, 10).eval()
        model.load_state_dict(original["state_dict"])
        twin.load_state_dict(ckpt["state_dict"])
        x = torch.randn(4, 1, 28, 28)
        assert torch.equal(model(x), twin(x))
        cache = dump(data_cfg, imported, tmp_path / f"cache_{weights.suffix[1:]}")
        for split in ("train", "test"):
            expected, got = arrays(reference / f"{split}.h5"), arrays(cache / f"{split}.h5")
            assert expected.keys() == got.keys()
            for name in expected:
                assert np.array_equal(expected[name], got[name]), (weights.name, split, name)


def test_a_teacher_trained_here_records_the_data_statistics_at_the_data_size(teacher_ckpt, data_cfg):
    info = load_checkpoint(teacher_ckpt)["model_info"]
    assert info["preprocess"] == {"resize": 28, "crop": 28, "interpolation": "bilinear", "mean": [0.286],
                                  "std": [0.353], "channels": 1}


def test_wrapped_state_dicts_and_data_parallel_prefixes_are_unwrapped(data_cfg, teacher_ckpt, tmp_path):
    state = load_checkpoint(teacher_ckpt)["state_dict"]
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    params = params_for(data_cfg, tmp_path, "resnet8")
    import_teacher(params, wrapped)
    got = load_checkpoint(Path(params.teacher.out) / "teacher.pt")["state_dict"]
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("resize, crop", [(36, 32), (20, 16)])  # up, and down (antialiased)
def test_teacher_input_is_torchvisions_grayscale_resize_crop_and_normalize(resize, crop):
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    pre = Preprocess(resize, crop, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3)
    expected = by_hand(images, resize, crop, pre.mean, pre.std)
    assert torch.equal(TeacherInput(pre, 1)(images), expected)


def test_torchvision_import_takes_the_weights_transforms_of_the_published_file(data_cfg, tmp_path):
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    path = resnet18_file(tmp_path, 10, name=Path(weights.url).name)  # the published file's name
    params = params_for(data_cfg, tmp_path, "torchvision:resnet18", validation=2)  # scored at 224 px: few rows
    import_teacher(params, path)
    info = load_checkpoint(Path(params.teacher.out) / "teacher.pt")["model_info"]
    t = weights.transforms()
    assert info["preprocess"] == {"resize": t.resize_size[0], "crop": t.crop_size[0], "interpolation": "bilinear",
                                  "mean": t.mean, "std": t.std, "channels": 3}


def test_timm_import_takes_its_pretrained_cfg_and_flags_override_it(data_cfg, tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), path)
    cfg = model.pretrained_cfg
    params = params_for(data_cfg, tmp_path, "timm:test_resnet")
    import_teacher(params, path)
    pre = load_checkpoint(Path(params.teacher.out) / "teacher.pt")["model_info"]["preprocess"]
    size = cfg["input_size"][-1]
    assert pre == {"resize": math.floor(size / cfg["crop_pct"]), "crop": size, "interpolation": cfg["interpolation"],
                   "mean": list(cfg["mean"]), "std": list(cfg["std"]), "channels": 3}
    result = CliRunner().invoke(main, ["import-teacher", str(path), "--arch", "timm:test_resnet", "--out",
                                       str(tmp_path / "flags"), "--resize", "40", "--crop", "32", "--mean",
                                       "0.5,0.5,0.5", "-S", f"data.root={data_cfg.root}", "-S", "data.train_limit=600",
                                       "-S", "data.test_limit=300", "-S", "data.validation=60"])
    assert result.exit_code == 0, result.output
    pre = load_checkpoint(tmp_path / "flags" / "teacher.pt")["model_info"]["preprocess"]
    assert (pre["resize"], pre["crop"], pre["mean"], pre["std"]) == (40, 32, [0.5, 0.5, 0.5], list(cfg["std"]))


# ---------------------------------------------------------------- end to end


def distil(data_cfg, cache: Path, tmp_path: Path, model: str = "cnn_tiny", loss=None, **extra) -> dict:
    from logitcache.student.train import train_student

    student = {"model": model, "loss": loss or {"kd": {}}, "steps": 2, "evaluations": 1, "batch_size": 32,
               "caches": [str(cache / "train.h5")], "test_cache": str(cache / "test.h5"), "out": str(tmp_path / "s"),
               **extra}
    return train_student(validate({"data": data_cfg.model_dump(), "students": {"s": student}}), "s")


@pytest.mark.slow
def test_torchvision_resnet18_imports_dumps_and_distils(data_cfg, tmp_path):
    path = resnet18_file(tmp_path, 10)
    params = params_for(data_cfg, tmp_path, "torchvision:resnet18", preprocess={"resize": 36, "crop": 32})
    metrics = import_teacher(params, path)
    assert 0 <= metrics["val_acc"] <= 1
    teacher = Path(params.teacher.out) / "teacher.pt"
    cache = dump(data_cfg, teacher, tmp_path / "cache", views=1)
    meta = cache_meta(cache / "train.h5")
    pre = {"resize": 36, "crop": 32, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225], "channels": 3}
    assert meta["transform"]["preprocess"] == pre
    assert meta["teacher"]["source"]["sha256"] == sha256(path)
    model = torchvision.models.resnet18(num_classes=10).eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    test = np.load(Path(data_cfg.root) / "fashion_mnist" / "test_images.npy")[:8]
    with torch.no_grad():
        expected = model(by_hand(torch.from_numpy(test), 36, 32, pre["mean"], pre["std"]))
    cached = torch.from_numpy(arrays(cache / "test.h5")["logits"][:8, 0]).float()
    assert torch.allclose(cached, expected, atol=2e-2, rtol=2e-3)
    assert distil(data_cfg, cache, tmp_path)["test_acc"] >= 0
    result = CliRunner().invoke(main, ["inspect", str(cache / "test.h5"), "--verify", "--teacher", str(teacher),
                                       "--samples", "8", "-S", f"data.root={data_cfg.root}", "-S",
                                       "data.train_limit=600", "-S", "data.test_limit=300"])
    assert result.exit_code == 0, result.output
    assert "preprocess resize 36, crop 32 (bilinear)" in result.output
    assert f"imported   from {path} sha256 {sha256(path)[:16]}" in result.output


@pytest.mark.slow
def test_a_timm_teacher_imports_dumps_and_distils_into_a_timm_student(data_cfg, tmp_path):
    import timm

    torch.manual_seed(0)
    path = tmp_path / "timm.pth"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), path)
    params = params_for(data_cfg, tmp_path, "timm:test_resnet", preprocess={"resize": 32, "crop": 32})
    import_teacher(params, path)
    cache = dump(data_cfg, Path(params.teacher.out) / "teacher.pt", tmp_path / "cache", views=1,
                 layers=["layer2"])
    meta = cache_meta(cache / "train.h5")
    assert meta["transform"]["preprocess"]["crop"] == 32
    assert meta["teacher"]["source"]["sha256"] == sha256(path)
    hint = {"fitnets": {"pairs": [["layer2", "layer2"]]}, "kd": {}}
    assert distil(data_cfg, cache, tmp_path, model="timm:test_resnet", loss=hint)["test_acc"] >= 0


@pytest.mark.slow
def test_class_map_takes_the_teachers_logits_at_the_mapped_indices(data_cfg, tmp_path):
    path = resnet18_file(tmp_path, 20)
    mapping = [19, 3, 7, 0, 12, 5, 16, 9, 1, 11]
    classes = json.loads((Path(data_cfg.root) / "fashion_mnist" / "meta.json").read_text())["classes"]
    class_map = tmp_path / "classes.json"
    class_map.write_text(json.dumps(dict(zip(classes, mapping))))
    params = params_for(data_cfg, tmp_path, "torchvision:resnet18", preprocess={"resize": 32, "crop": 32})
    import_teacher(params, path, num_classes=20, class_map=class_map)
    teacher = Path(params.teacher.out) / "teacher.pt"
    cache = dump(data_cfg, teacher, tmp_path / "cache", views=1, layers=["net.layer2"])
    model = torchvision.models.resnet18(num_classes=20).eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    test = torch.from_numpy(np.load(Path(data_cfg.root) / "fashion_mnist" / "test_images.npy")[:16])
    with torch.no_grad():
        full = model(by_hand(test, 32, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    cached = torch.from_numpy(arrays(cache / "test.h5")["logits"][:16, 0]).float()
    assert cached.shape == (16, 10)
    assert torch.allclose(cached, full[:, mapping], atol=2e-2, rtol=2e-3)
    # evaluate and --online run the same mapped teacher on its own rendering of the view
    from logitcache.student.evaluate import evaluate_checkpoint

    assert evaluate_checkpoint(teacher, "cpu", str(cache / "test.h5"))["agreement"] >= 0.9
    assert distil(data_cfg, cache, tmp_path, online=True, teacher=str(teacher))["online"] is True


# ---------------------------------------------------------------- bad input


class Payload:
    """Unpickling this runs code: it would create the file named by `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def run_import(data_cfg, out: Path, *args: str):
    return CliRunner().invoke(main, ["import-teacher", *args, "--out", str(out), "-S", f"data.root={data_cfg.root}",
                                     "-S", "data.train_limit=600", "-S", "data.test_limit=300", "-S",
                                     "data.validation=60"])


def assert_refused(result, out: Path, *words: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, message
    assert not out.exists(), "nothing may be written"


def test_channel_counts_other_than_grey_to_rgb_are_refused_in_one_line():
    rgb = Preprocess(None, None, "bilinear", (0.5,), (0.5,), 1)
    with pytest.raises(LogitcacheError, match=r"takes 1-channel images, the data has 3") as error:
        TeacherInput(rgb, 3)
    assert "\n" not in str(error.value)


def test_a_missing_weight_file_is_refused(data_cfg, tmp_path):
    result = run_import(data_cfg, tmp_path / "out", str(tmp_path / "nope.pth"), "--arch", "resnet8")
    assert_refused(result, tmp_path / "out", "nope.pth", "does not exist")


def test_a_pickle_that_needs_code_is_refused_without_running_it(data_cfg, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Payload(str(marker))}, path)
    result = run_import(data_cfg, tmp_path / "out", str(path), "--arch", "resnet8")
    assert_refused(result, tmp_path / "out", "refused without running", "state_dict")
    assert not marker.exists()


def test_a_state_dict_for_another_architecture_names_the_keys(data_cfg, teacher_ckpt, tmp_path):
    path = tmp_path / "resnet8.pt"
    torch.save(load_checkpoint(teacher_ckpt)["state_dict"], path)
    result = run_import(data_cfg, tmp_path / "out", str(path), "--arch", "cnn_tiny")
    assert_refused(result, tmp_path / "out", "missing 'block1.0.weight'", "unexpected 'conv1.weight'",
                   "another architecture")


def test_a_prefixed_state_dict_names_the_prefix(data_cfg, teacher_ckpt, tmp_path):
    path = tmp_path / "prefixed.pt"
    torch.save({f"backbone.{k}": v for k, v in load_checkpoint(teacher_ckpt)["state_dict"].items()}, path)
    result = run_import(data_cfg, tmp_path / "out", str(path), "--arch", "resnet8")
    assert_refused(result, tmp_path / "out", "prefix 'backbone.'")


def test_a_wrong_num_classes_is_refused_by_the_heads_shape(data_cfg, tmp_path):
    path = resnet18_file(tmp_path, 10)
    result = run_import(data_cfg, tmp_path / "out", str(path), "--arch", "torchvision:resnet18", "--num-classes", "5")
    assert_refused(result, tmp_path / "out", "fc.weight has shape [10, 512]", "needs [5, 512]", "--num-classes")


@pytest.mark.parametrize("mapping, words", [
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 20], ["maps to 20", "0..19"]),
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 8], ["teacher output 8 is mapped twice"]),
    ([0, 1, 2], ["each of the 10 data classes"]),
    ({"Sneaker": 3, "sandal": 2}, ["'sandal' is not a data class"]),
])
def test_a_bad_class_map_is_refused(data_cfg, tmp_path, mapping, words):
    path = resnet18_file(tmp_path, 20)
    class_map = tmp_path / "classes.json"
    class_map.write_text(json.dumps(mapping))
    result = run_import(data_cfg, tmp_path / "out", str(path), "--arch", "torchvision:resnet18", "--num-classes",
                        "20", "--class-map", str(class_map))
    assert_refused(result, tmp_path / "out", *words)


@pytest.mark.parametrize("arch, close", [("timm:resnet10", "timm:resnet10t"),
                                         ("torchvision:resnet19", "torchvision:resnet18")])
def test_an_unknown_family_name_is_refused_with_close_matches(data_cfg, tmp_path, arch, close):
    path = tmp_path / "w.pth"
    torch.save({}, path)
    result = run_import(data_cfg, tmp_path / "out", str(path), "--arch", arch)
    assert_refused(result, tmp_path / "out", f"unknown model '{arch}'", f"did you mean {close}")


def test_an_output_import_did_not_write_is_never_replaced(data_cfg, teacher_ckpt, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(load_checkpoint(teacher_ckpt)["state_dict"], path)
    trained = teacher_ckpt.parent
    before = sha256(teacher_ckpt)
    result = run_import(data_cfg, trained, str(path), "--arch", "resnet8")
    assert result.exit_code == 2 and "was not written by import-teacher" in result.output
    assert sha256(teacher_ckpt) == before
    onto_input = tmp_path / "out"
    onto_input.mkdir()
    own = onto_input / "teacher.pt"
    own.write_bytes(path.read_bytes())
    result = run_import(data_cfg, onto_input, str(own), "--arch", "resnet8")
    assert result.exit_code == 2 and "is one of the outputs" in result.output
    assert own.read_bytes() == path.read_bytes()


def test_an_earlier_import_is_replaced_also_when_it_stopped_before_its_checkpoint(data_cfg, teacher_ckpt, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(load_checkpoint(teacher_ckpt)["state_dict"], path)
    for _ in range(2):
        result = run_import(data_cfg, tmp_path / "out", str(path), "--arch", "resnet8")
        assert result.exit_code == 0, result.output
    (tmp_path / "out" / "teacher.pt").unlink()  # as a kill before the last write leaves it
    assert run_import(data_cfg, tmp_path / "out", str(path), "--arch", "resnet8").exit_code == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metrics.json").write_text('{"test_acc": 0.9}')
    assert run_import(data_cfg, foreign, str(path), "--arch", "resnet8").exit_code == 2
    assert (foreign / "metrics.json").read_text() == '{"test_acc": 0.9}'


# ---------------------------------------------------------------- fine-tuning and scoring


def test_fine_tuning_starts_from_the_imported_weights(data_cfg, teacher_ckpt, tmp_path):
    state = tmp_path / "state.pt"
    torch.save(load_checkpoint(teacher_ckpt)["state_dict"], state)
    params = params_for(data_cfg, tmp_path, "resnet8")
    imported = import_teacher(params, state)
    trained = json.loads((teacher_ckpt.parent / "metrics.json").read_text())
    assert imported["val_acc"] == trained["val_acc"]  # the same weights score the same on the validation rows
    out = tmp_path / "tuned"
    metrics = train_teacher(params_for(data_cfg, tmp_path, "resnet8", init=str(Path(params.teacher.out) / "teacher.pt"),
                                       epochs=1, batch_size=64, lr=0.01, backbone_lr=0.001, out=str(out)))
    assert metrics["init_val_acc"] == imported["val_acc"]
    history = json.loads((out / "history.json").read_text())
    assert history[0]["init_val_acc"] == imported["val_acc"]
    assert load_checkpoint(out / "teacher.pt")["model_info"]["init"]["sha256"] == \
        sha256(Path(params.teacher.out) / "teacher.pt")


def test_fine_tuning_with_another_class_count_makes_a_new_head(data_cfg, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "five.pt"
    five = build_model("resnet8", 1, 5)
    torch.save(five.state_dict(), path)
    params = params_for(data_cfg, tmp_path, "resnet8")
    assert import_teacher(params, path, num_classes=5)["val_acc"] is None  # 5 outputs, 10 classes: not scored
    from logitcache.teacher.init import initial_teacher
    from logitcache.core.data import load_split

    cfg = params_for(data_cfg, tmp_path, "resnet8", init=str(Path(params.teacher.out) / "teacher.pt"),
                     backbone_lr=0.001).teacher
    start = initial_teacher(cfg, load_split(data_cfg, "train"))
    assert start.head == ["fc.weight", "fc.bias"]
    kept = {k: v for k, v in start.model.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(v, five.state_dict()[k]) for k, v in kept.items())
    groups = start.parameter_groups(cfg)
    assert groups[0]["lr"] == 0.001 and [p.shape for p in groups[1]["params"]] == [(10, 64), (10,)]


# ---------------------------------------------------------------- timm students


def test_timm_student_layers_come_from_fx():
    nodes = feature_nodes(build_model("timm:test_resnet", 1, 10))
    assert "layer2" in nodes and nodes[-1] == "fc"


def test_a_model_fx_cannot_trace_is_named_in_one_line():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = Branchy()
    model.logitcache_name = "timm:branchy"
    with pytest.raises(LogitcacheError, match=r"^model timm:branchy cannot be traced by torch.fx") as error:
        feature_nodes(model)
    assert "\n" not in str(error.value)


def timm_student_checkpoint(data_cfg, path: Path) -> Path:
    from logitcache.core.io import save_checkpoint

    torch.manual_seed(0)
    model = build_model("timm:test_resnet", 1, 10)
    save_checkpoint(path, model.state_dict(), {"data": data_cfg.model_dump(mode="json")},
                    model_info={"model": "timm:test_resnet", "in_channels": 1, "num_classes": 10})
    return path


def test_a_timm_student_prunes_to_a_checkpoint_that_loads_again(data_cfg, tmp_path):
    from logitcache.core.io import load_model
    from logitcache.deploy.prune import prune_checkpoint

    ckpt = timm_student_checkpoint(data_cfg, tmp_path / "student.pt")
    params = validate({"prune": {"ratio": 0.3, "out": str(tmp_path / "pruned" / "student.pt")}})
    metrics = prune_checkpoint(params, ckpt)
    assert metrics["params"] < metrics["params_before"]
    model, _ = load_model(tmp_path / "pruned" / "student.pt")
    assert sum(p.numel() for p in model.parameters()) == metrics["params"]


@pytest.mark.slow
def test_a_timm_student_exports_to_onnx_and_pt2(data_cfg, tmp_path):
    from logitcache.deploy.export import export_checkpoint

    ckpt = timm_student_checkpoint(data_cfg, tmp_path / "student.pt")
    params = validate({"export": {"out": str(tmp_path / "deploy"), "calibration_cache": None, "latency_runs": 2,
                                  "warmup_runs": 0, "throughput_runs": 1, "threads": 1}})
    metrics = export_checkpoint(params, ckpt, "timm")
    assert metrics["onnx_fp32"]["max_abs_logit_diff"] <= 1e-4


# ---------------------------------------------------------------- the documented commands

ROOT = Path(__file__).resolve().parents[1]


def documented_commands() -> list[str]:
    """Every `logitcache ...` line of docs/teachers.md's and README's "Your own teacher" shell blocks, and the
    command of dvc.yaml's documented import_teacher stage."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own teacher"):]
    section = section[:section.index("\n## ", 1)]
    lines = []
    for text in ((ROOT / "docs" / "teachers.md").read_text(), section):
        for block in text.split("```bash")[1:]:
            lines += [line for line in block.split("```")[0].splitlines() if line.startswith("logitcache ")]
    lines += [line.split("cmd: ", 1)[1] for line in (ROOT / "dvc.yaml").read_text().splitlines()
              if line.lstrip("# ").startswith("cmd: logitcache import-teacher")]
    return lines


def test_the_documented_commands_cover_the_guide():
    commands = documented_commands()
    assert len(commands) >= 10
    assert any("import-teacher" in c and "torchvision:" in c for c in commands)
    assert any("import-teacher" in c and ".safetensors" in c for c in commands)
    assert any("import-teacher" in c and "timm:" in c for c in commands)


@pytest.mark.parametrize("line", documented_commands())
def test_every_documented_command_parses_and_its_settings_validate(line, tmp_path, monkeypatch):
    import shlex

    import click

    from logitcache.core.config import load_params

    monkeypatch.chdir(tmp_path)  # no params.yaml: the built-in defaults plus the line's overrides
    name, *args = shlex.split(line.split("  #")[0])[1:]
    command = main.get_command(click.Context(main), name)
    assert command is not None, f"no command {name!r}: {line}"
    ctx = command.make_context(name, list(args))
    overrides = list(ctx.params.get("overrides") or ())
    load_params(None, overrides)
    if "arch" in ctx.params and ctx.params["arch"]:
        load_params(None, [f"teacher.model={ctx.params['arch']}"])


def test_verify_refuses_a_cache_whose_recorded_preprocessing_is_not_the_teachers(data_cfg, teacher_ckpt, cache_dir,
                                                                                  tmp_path):
    import shutil

    from logitcache.cache.format import set_attr
    from logitcache.cache.inspect import verify

    cache = tmp_path / "test.h5"
    shutil.copy(cache_dir / "test.h5", cache)
    with h5py.File(cache, "r+") as f:
        transform = json.loads(f.attrs["transform"])
        assert transform["preprocess"]["mean"] == [0.286]
        transform["preprocess"]["mean"] = [0.5]
        set_attr(f, "transform", transform)
    with pytest.raises(LogitcacheError, match="made with teacher preprocessing"):
        verify(cache, teacher_ckpt, data_cfg, samples=4)
    assert verify(cache_dir / "test.h5", teacher_ckpt, data_cfg, samples=4)["ok"]
