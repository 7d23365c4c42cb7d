import pytest
from click.testing import CliRunner

from logitcache.cli import main


def _commands():
    return sorted(main.commands)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "Usage:" in result.output


def test_main_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("prepare-data", "train-teacher", "models", "layers"):
        assert command in result.output


def test_models_lists_small_families_and_torchvision():
    result = CliRunner().invoke(main, ["models"])
    names = result.output.split()
    assert {"resnet20", "resnet32x4", "wrn_40_2", "cnn_tiny", "resnet18", "mobilenet_v3_small"} <= set(names)


def test_layers_lists_feature_nodes():
    result = CliRunner().invoke(main, ["layers", "resnet20"])
    assert result.exit_code == 0
    assert {"layer1", "layer2", "layer3"} <= set(result.output.split())


@pytest.mark.parametrize("args, words", [
    (["layers", "resnet21"], "unknown model 'resnet21'"),
    (["train-teacher", "--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["train-teacher", "-S", "teacher.lr=-1"], "teacher.lr"),
    (["train-teacher", "-S", "teacher.colour=red"], "unknown key 'teacher.colour'"),
    (["prepare-data", "--params", "does-not-exist.yaml"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(args, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output


def test_prepare_data_command(tmp_path):
    result = CliRunner().invoke(main, ["prepare-data", "--root", str(tmp_path), "-S", "data.train_limit=10",
                                       "-S", "data.test_limit=10"])
    assert result.exit_code == 0, result.output
    assert "train: 10 samples" in result.output
    assert (tmp_path / "fashion_mnist" / "meta.json").is_file()
