"""`logitcache evaluate`: what it refuses before scoring a checkpoint."""

from click.testing import CliRunner

from logitcache.cli import main


def test_a_test_cache_that_does_not_exist_is_refused_instead_of_reporting_no_agreement(teacher_ckpt, tmp_path):
    result = CliRunner().invoke(main, ["evaluate", str(teacher_ckpt), "--device", "cpu",
                                       "--test-cache", str(tmp_path / "nonexistent.h5")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: --test-cache {tmp_path / 'nonexistent.h5'} does not exist or is not a "
                                    "file; ") and result.output.count("\n") == 1
