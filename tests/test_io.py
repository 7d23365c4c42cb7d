import os
import shutil
from pathlib import Path

import pytest

from logitcache.core.errors import LogitcacheError
from logitcache.core.io import check_output_folder


def test_a_folder_that_can_be_made_passes_and_nothing_is_created(tmp_path):
    check_output_folder(tmp_path / "a" / "b", "teacher.out")
    check_output_folder(tmp_path, "teacher.out")  # an existing, writable folder
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("relative, words", [
    ("a-file", "teacher.out: {tmp}/a-file is a file, not a folder"),
    ("a-file/x/y", "teacher.out: {tmp}/a-file/x/y cannot be made: {tmp}/a-file is a file, not a folder"),
])
def test_a_file_in_the_way_is_refused(tmp_path, relative, words):
    (tmp_path / "a-file").write_text("in the way\n")
    with pytest.raises(LogitcacheError) as e:
        check_output_folder(tmp_path / relative, "teacher.out")
    assert str(e.value).startswith(words.format(tmp=tmp_path)) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a mounted /proc")
def test_a_folder_on_a_virtual_file_system_is_refused():
    with pytest.raises(LogitcacheError, match=r"^dump.out: cannot create or write /proc/logitcache-x/y \(no folder "
                                              r"can be made in /proc: No such file or directory\)"):
        check_output_folder("/proc/logitcache-x/y", "dump.out")
    assert not Path("/proc/logitcache-x").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; "
                    "tests/test_cli.py runs this case without capabilities")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(LogitcacheError, match="Permission denied"):
        check_output_folder(locked / "out", "teacher.out")
    shutil.rmtree(locked, ignore_errors=True)


def test_a_checkpoint_whose_config_is_not_json_is_one_line(tmp_path):
    import torch

    from logitcache.core.io import load_checkpoint

    for config in ("{not json", "[1, 2]"):
        torch.save({"state_dict": {}, "config": config}, tmp_path / "bad.pt")
        with pytest.raises(LogitcacheError, match=r"^checkpoint .*bad.pt: its config is not a JSON object; "):
            load_checkpoint(tmp_path / "bad.pt")


def test_a_raw_pickle_is_refused_without_torchs_warning(tmp_path):
    import pickle
    import warnings

    from logitcache.core.io import load_checkpoint

    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"state_dict": {}, "config": "{}"}, protocol=4))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(LogitcacheError, match=r"^checkpoint .*raw.pkl "):
            load_checkpoint(tmp_path / "raw.pkl")
    assert [str(w.message) for w in shown] == []
