"""`logitcache evaluate`: what it refuses before scoring a checkpoint."""

from click.testing import CliRunner

from logitcache.cli import main


def test_a_test_cache_that_does_not_exist_is_refused_instead_of_reporting_no_agreement(teacher_ckpt, tmp_path):
    result = CliRunner().invoke(main, ["evaluate", str(teacher_ckpt), "--device", "cpu",
                                       "--test-cache", str(tmp_path / "nonexistent.h5")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: --test-cache {tmp_path / 'nonexistent.h5'} does not exist or is not a "
                                    "file; ") and result.output.count("\n") == 1


def test_a_test_cache_of_another_teacher_than_the_students_is_refused(data_cfg, cache_dir, tmp_path):
    import json
    import shutil

    import h5py

    from logitcache.core.config import validate
    from logitcache.student.train import train_student

    student = {"model": "cnn_tiny", "steps": 2, "evaluations": 1, "batch_size": 64, "workers": 0,
               "caches": [str(cache_dir / "train.h5")], "test_cache": str(cache_dir / "test.h5"),
               "out": str(tmp_path / "s")}
    train_student(validate({"data": data_cfg.model_dump(), "students": {"s": student}}), "s")
    other = tmp_path / "other_test.h5"
    shutil.copy(cache_dir / "test.h5", other)
    with h5py.File(other, "r+") as f:
        f.attrs["teacher"] = json.dumps({**json.loads(f.attrs["teacher"]), "checkpoint_sha256": "0" * 64})
    checkpoint = str(tmp_path / "s" / "student.pt")
    refused = CliRunner().invoke(main, ["evaluate", checkpoint, "--device", "cpu", "--test-cache", str(other)])
    assert refused.exit_code == 2, refused.output
    assert refused.output.startswith(f"error: --test-cache {other} was made by another teacher checkpoint (sha256 "
                                     "0000000000000000…) than the one") and refused.output.count("\n") == 1
    scored = CliRunner().invoke(main, ["evaluate", checkpoint, "--device", "cpu", "--test-cache",
                                       str(cache_dir / "test.h5")])
    assert scored.exit_code == 0, scored.output
