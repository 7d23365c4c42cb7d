"""Reading a cache: attributes edited to other valid values are caught before they replay the wrong views."""

import json
import shutil

import h5py
import pytest
from click.testing import CliRunner

from logitcache.cache.reader import Cache
from logitcache.cli import main
from logitcache.core.errors import LogitcacheError


def test_a_cache_whose_crop_padding_was_edited_is_refused_by_the_student_in_one_line(data_cfg, cache_dir, tmp_path):
    path = tmp_path / "train.h5"
    shutil.copy(cache_dir / "train.h5", path)
    with h5py.File(path, "r+") as f:
        transform = json.loads(f.attrs["transform"])
        transform["augment"]["crop_padding"] = 1
        f.attrs["transform"] = json.dumps(transform)
    with pytest.raises(LogitcacheError, match="the stored view codes do not fit its transform attribute "
                                              r"\(crop_padding 1\); the file is damaged, re-dump it"):
        Cache(path).view_params()
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"data": data_cfg.model_dump(mode="json"), "students": {"s": {
        "model": "cnn_tiny", "epochs": 1, "workers": 0, "caches": [str(path)], "test_cache": str(cache_dir / "test.h5"),
        "out": str(tmp_path / "s")}}}))
    result = CliRunner().invoke(main, ["train-student", "s", "--params", str(params)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "the stored view codes do not fit" in result.output
