import pytest
import yaml

from logitcache.core.config import Params, load_params
from logitcache.core.errors import LogitcacheError


def test_defaults_without_params_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_params() == Params()


def test_repo_params_yaml_matches_builtin_defaults():
    """params.yaml documents the defaults: a missing key means the same as the file's value."""
    raw = yaml.safe_load(open("params.yaml"))
    params = load_params("params.yaml")
    for section in ("data", "teacher", "dump"):
        assert getattr(params, section) == getattr(Params(), section), section
        assert set(raw[section]) <= set(type(getattr(params, section)).model_fields)


def test_overrides_apply_and_parse_yaml_values(tmp_path):
    params = load_params(None, ["teacher.epochs=3", "teacher.augment.flip=false", "teacher.lr=0.05"])
    assert params.teacher.epochs == 3 and params.teacher.augment.flip is False and params.teacher.lr == 0.05


@pytest.mark.parametrize("override, words", [
    ("teacher.lrr=0.1", "unknown key 'teacher.lrr'"),
    ("teacher.lr=-0.1", "teacher.lr: Input should be greater than 0"),
    ("teacher.epochs=-1", "teacher.epochs"),
    ("teacher.model=resnet21", "unknown model 'resnet21'"),
    ("data.dataset=mnist3", "data.dataset"),
    ("teacher.augment.policy=[{name: NoSuchOp}]", "torchvision.transforms.v2"),
    ("teacher", "section.key=value"),
    ("dump.layers=[layer2, {name: layer2, forms: [attention]}]", "layer(s) layer2 listed twice"),
    ("dump.layers=[{name: layer2, forms: []}]", "dump.layers.0.forms: List should have at least 1 item"),
    ("dump.layers=[{name: layer2, forms: [gram]}]", "dump.layers.0.forms.0: Input should be 'map', 'attention' or"),
    ("dump.layers=[{name: layer2, forms: [map, map]}]", "a form is listed twice"),
    ("dump.layers=[{name: layer2, pooling: 2}]", "unknown key 'dump.layers.0.pooling'"),
    ("dump.layers=[{name: layer2, p: 0}]", "dump.layers.0.p: Input should be greater than 0"),
])
def test_bad_values_are_one_line_errors(override, words):
    with pytest.raises(LogitcacheError) as e:
        load_params(None, [override])
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_or_bad_params_file(tmp_path):
    with pytest.raises(LogitcacheError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(LogitcacheError, match="is a directory"):
        load_params(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [1, 2\n")
    with pytest.raises(LogitcacheError, match="not valid YAML"):
        load_params(bad)


def test_layer_entries_are_names_or_mappings_with_forms_pool_and_p():
    params = load_params(None, ["dump.feature_pool=3",
                                "dump.layers=[layer1, {name: layer2, forms: [map, attention], pool: 0, p: 4}]"])
    assert [(s.name, s.forms, s.pool, s.p) for s in params.dump.layer_specs()] == [
        ("layer1", ["map"], 3, 2.0), ("layer2", ["map", "attention"], 0, 4.0)]
    assert [s.name for s in load_params(None, ["dump.layers=layer1, layer3"]).dump.layer_specs()] == ["layer1", "layer3"]
    assert [(s.name, s.forms, s.pool) for s in Params().dump.layer_specs()] == [("layer2", ["map"], 4)]
