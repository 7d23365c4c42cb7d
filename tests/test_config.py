import pytest
import yaml

from logitcache.core.config import Params, load_params, validate
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


def test_the_pruned_model_is_a_student_like_the_others():
    """students.pruned starts from the pruned checkpoint; train-student finds it as any student."""
    raw = yaml.safe_load(open("params.yaml"))
    params = load_params("params.yaml")
    assert "pruned" not in raw and raw["students"]["pruned"]["init"] == raw["prune"]["out"]
    assert params.student("pruned") is params.students["pruned"]
    assert params.student("pruned").init == "data/pruned/teacher.pt" and params.student("pruned").seeds is None


def test_overrides_apply_and_parse_yaml_values(tmp_path):
    params = load_params(None, ["teacher.epochs=3", "teacher.augment.flip=false", "teacher.lr=0.05"])
    assert params.teacher.epochs == 3 and params.teacher.augment.flip is False and params.teacher.lr == 0.05


@pytest.mark.parametrize("override, words", [
    ("teacher.lrr=0.1", "invalid -S teacher.lrr=0.1: unknown key 'teacher.lrr'"),
    ("teacher.lr=-0.1", "invalid -S teacher.lr=-0.1: Input should be greater than 0, got -0.1"),
    ("teacher.epochs=-1", "teacher.epochs"),
    ("teacher.model=resnet21", "unknown model 'resnet21'"),
    ("data.dataset=mnist3", "invalid -S data.dataset=mnist3: unknown data set 'mnist3'; choose one of fashion_mnist"),
    ("students.s.label_smoothing=0.1", "invalid -S students.s.label_smoothing=0.1: students do not use "
                                       "'label_smoothing' (a teacher setting); remove 'students.s.label_smoothing'"),
    ("students.s.backbone_lr=0.01", "students do not use 'backbone_lr' (a teacher setting)"),
    ("students.s.preprocess={crop: 28}", "students do not use 'preprocess' (a teacher setting)"),
    ("pruned={init: data/pruned/teacher.pt}", "invalid -S pruned={init: data/pruned/teacher.pt}: unknown key 'pruned'"),
    ("teacher.augment.policy=[{name: NoSuchOp}]", "torchvision.transforms.v2"),
    ("teacher", "section.key=value"),
    ("dump.layers=[layer2, {name: layer2, forms: [attention]}]", "layer(s) layer2 listed twice"),
    ("dump.layers=[{name: layer2, forms: []}]", "dump.layers.0.forms: List should have at least 1 item"),
    ("dump.layers=[{name: layer2, forms: [gram]}]", "dump.layers.0.forms.0: unknown stored form 'gram'; choose one of map, attention, embedding"),
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


def test_an_error_names_the_flag_or_override_that_set_the_key():
    with pytest.raises(LogitcacheError) as e:
        load_params(None, [], flags={"--views": "dump.views=0"})
    assert str(e.value) == "invalid --views (dump.views): views must be >= 1 or 'all', got 0"
    with pytest.raises(LogitcacheError) as e:  # -S applies after the flag, and is the one reported
        load_params(None, ["dump.views=-2"], flags={"--views": "dump.views=3"})
    assert str(e.value) == "invalid -S dump.views=-2: views must be >= 1 or 'all', got -2"
    with pytest.raises(LogitcacheError) as e:  # a whole section set at once: the key inside it is named
        load_params(None, ["teacher.augment={crop_padding: -1}"])
    assert str(e.value).startswith("invalid -S teacher.augment={crop_padding: -1}: teacher.augment.crop_padding: ")


def test_an_error_in_the_params_file_names_the_file_even_with_overrides(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("dump:\n  views: 0\n")
    with pytest.raises(LogitcacheError) as e:
        load_params(path, ["teacher.epochs=3"], flags={"--layers": "dump.layers=layer1"})
    assert str(e.value) == f"invalid {path}: dump.views: views must be >= 1 or 'all', got 0"
    path.write_text("teacher:\n  epochs: 3\n")
    with pytest.raises(LogitcacheError) as e:
        load_params(path, ["dump.views=0"])
    assert str(e.value) == "invalid -S dump.views=0: views must be >= 1 or 'all', got 0"


@pytest.mark.parametrize("seeds", [[0, 0], [2, 1, 2]])
def test_repeated_seeds_are_refused(seeds):
    with pytest.raises(LogitcacheError, match=r"^invalid params.yaml: students.s.seeds: seeds must differ"):
        validate({"students": {"s": {"seeds": seeds}}}, source="params.yaml")
    assert validate({"students": {"s": {"seeds": sorted(set(seeds))}}}).students["s"].seeds == sorted(set(seeds))


def test_layer_entries_are_names_or_mappings_with_forms_pool_and_p():
    params = load_params(None, ["dump.feature_pool=3",
                                "dump.layers=[layer1, {name: layer2, forms: [map, attention], pool: 0, p: 4}]"])
    assert [(s.name, s.forms, s.pool, s.p) for s in params.dump.layer_specs()] == [
        ("layer1", ["map"], 3, 2.0), ("layer2", ["map", "attention"], 0, 4.0)]
    assert [s.name for s in load_params(None, ["dump.layers=layer1, layer3"]).dump.layer_specs()] == ["layer1", "layer3"]
    assert [(s.name, s.forms, s.pool) for s in Params().dump.layer_specs()] == [
        ("layer2", ["map", "attention"], 4), ("layer3", ["embedding"], 4)]


def test_an_override_whose_value_is_not_valid_yaml_is_one_line_naming_it():
    with pytest.raises(LogitcacheError) as e:
        load_params(None, ["students.kd.seeds=[0, 1"])
    assert str(e.value).startswith("override 'students.kd.seeds=[0, 1': the value is not valid YAML")
    assert "\n" not in str(e.value)


def test_an_unknown_section_set_by_an_override_is_blamed_on_the_override_not_the_file(tmp_path):
    (tmp_path / "params.yaml").write_text("teacher: {epochs: 2}\n")
    with pytest.raises(LogitcacheError, match=r"^invalid -S foo.bar=1: unknown key 'foo'"):
        load_params(tmp_path / "params.yaml", ["foo.bar=1"])


@pytest.mark.parametrize("override", ["teacher.lr=.inf", "teacher.lr=inf", "teacher.weight_decay=.nan",
                                      "export.atol=.inf", "prune.ratio=.nan"])
def test_nan_and_infinity_are_refused_wherever_a_number_is_read(override):
    with pytest.raises(LogitcacheError, match=r"Input should be a finite number|valid integer"):
        load_params(None, [override])


def test_nan_in_a_method_setting_is_refused():
    from logitcache.student.methods import parse_loss

    with pytest.raises(LogitcacheError, match=r"kd.weight.*finite number"):
        parse_loss({"kd": {"weight": float("nan")}}, "students.kd")


def test_a_number_of_epochs_beyond_any_sensible_run_is_refused():
    with pytest.raises(LogitcacheError, match=r"^invalid -S teacher.epochs=100000000000000000000: Input should be "
                                              r"less than or equal to 100000"):
        load_params(None, ["teacher.epochs=100000000000000000000"])
