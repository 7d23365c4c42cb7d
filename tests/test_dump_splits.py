"""A dump of some splits never leaves the caches of one folder from two teachers."""

import hashlib
import shutil

from click.testing import CliRunner

from logitcache.cli import main
from logitcache.core.io import load_checkpoint, save_checkpoint


def test_dumping_one_split_with_another_teacher_beside_the_others_cache_is_refused(data_cfg, teacher_ckpt, cache_dir,
                                                                                 tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    for name in ("train.h5", "test.h5"):
        shutil.copy(cache_dir / name, out / name)
    ckpt = load_checkpoint(teacher_ckpt)  # the same weights in another file: another checkpoint sha256
    save_checkpoint(tmp_path / "other.pt", ckpt["state_dict"], ckpt["config"], model_info=ckpt["model_info"],
                    retrained=True)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    result = CliRunner().invoke(main, ["dump-teacher", "--overwrite", "--teacher", str(tmp_path / "other.pt"),
                                       "--out", str(out), "-S", "dump.splits=[test]", "-S", f"data.root={data_cfg.root}",
                                       "-S", "data.train_limit=600", "-S", "data.test_limit=300"])
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: {out / 'train.h5'} was made by another teacher checkpoint than "
                             f"{tmp_path / 'other.pt'}; dumping only test would leave caches of two teachers in {out}: "
                             "dump every split (-S dump.splits=[train,test]) or choose another dump.out\n")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before


def test_a_partial_dump_started_with_other_arguments_is_not_resumed_silently(data_cfg, teacher_ckpt, tmp_path,
                                                                            monkeypatch, capsys):
    import pytest

    from logitcache.core.config import validate
    from logitcache.core.errors import LogitcacheError
    from logitcache.teacher.dump import dump_teacher
    from logitcache.teacher.writer import CacheWriter

    def params(views):
        return validate({"data": data_cfg.model_dump(), "dump": {
            "teacher": str(teacher_ckpt), "out": str(tmp_path / "cache"), "views": views, "batch_size": 96,
            "workers": 0, "splits": ["train"], "layers": []}})

    original = CacheWriter.write

    def fail_after_the_first_batch(self, start, rows):
        if start > 0:
            raise LogitcacheError("stopped")
        return original(self, start, rows)

    monkeypatch.setattr(CacheWriter, "write", fail_after_the_first_batch)
    with pytest.raises(LogitcacheError):
        dump_teacher(params(2))
    assert (tmp_path / "cache" / "train.h5.partial").is_file()
    monkeypatch.setattr(CacheWriter, "write", original)
    capsys.readouterr()
    dump_teacher(params(3))
    assert (f"{tmp_path / 'cache' / 'train.h5.partial'} not resumed (it was started with other arguments): dumping "
            "from the first row") in capsys.readouterr().out
