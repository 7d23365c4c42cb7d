"""What the tests of one-line refusals share: the CLI run in-process, and the shape of a refusal."""

from click.testing import CliRunner

from logitcache.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, *words):
    """Exit 2, exactly one line `error: ...` naming `words`, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    for word in words:
        assert word in result.output, result.output
