"""Every metrics.json says what its bits depend on: torch and torchvision, CPU kernels, threads, device."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from logitcache.core.config import validate
from logitcache.core.provenance import KEY, environment
from logitcache.deploy.prune import prune_checkpoint
from logitcache.student.train import train_student
from logitcache.summary import summarize


def _expected(device: str = "cpu") -> dict:
    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "device": device, "pins": {}}


@pytest.mark.slow
def test_the_environment_names_the_kernels_and_threads_a_process_was_started_with():
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    env |= {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    code = "import json; from logitcache.core.provenance import environment; print(json.dumps(environment().as_dict()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {**_expected(), "cpu_capability": "DEFAULT", "threads": 1,
                               "pins": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def test_teacher_student_seeds_prune_and_summary_record_the_environment(data_cfg, cache_dir, teacher_ckpt, tmp_path):
    teacher = json.loads((teacher_ckpt.parent / "metrics.json").read_text())
    assert teacher[KEY]["torch"] == torch.__version__ and teacher[KEY]["device"] == "cpu"
    params = validate({"data": data_cfg.model_dump(), "teacher": {"out": str(teacher_ckpt.parent)},
                       "export": {"out": str(tmp_path / "deploy")},
                       "prune": {"out": str(tmp_path / "pruned" / "teacher.pt")},
                       "students": {"s": {"model": "cnn_tiny", "steps": 4, "batch_size": 64, "seeds": [0, 1],
                                          "caches": [str(cache_dir / "train.h5")],
                                          "test_cache": str(cache_dir / "test.h5"), "out": str(tmp_path / "s")}}})
    train_student(params, "s")
    for folder in (tmp_path / "s" / "runs" / "seed0", tmp_path / "s" / "runs" / "seed1", tmp_path / "s"):
        assert json.loads((folder / "metrics.json").read_text())[KEY] == _expected()
    assert prune_checkpoint(params, teacher_ckpt)[KEY] == _expected()
    assert json.loads((tmp_path / "pruned" / "metrics.json").read_text())[KEY] == _expected()
    summary = summarize(params, tmp_path / "summary")
    assert summary["s"][KEY] == _expected() and summary["teacher"][KEY] == teacher[KEY]


def test_seeds_trained_in_different_environments_keep_each_one():
    from logitcache.student.train import aggregate

    runs = [{"mode": "kd", "online": False, "select": "best", "test_acc": 0.5, "val_acc": 0.5, "agreement": 0.5,
             "kl_to_teacher": 0.1, "selected_step": 1, KEY: {**_expected(), "threads": t}} for t in (1, 2)]
    assert aggregate(runs, [0, 1])[KEY] == [runs[0][KEY], runs[1][KEY]]
    assert environment().as_dict() == _expected()
