import json

import pytest
import torch

from logitcache.core.io import load_checkpoint
from logitcache.core.models import build_model
from logitcache.teacher.train import train_teacher


@pytest.mark.slow
def test_short_teacher_training_learns_and_writes_a_safe_checkpoint(small_params):
    metrics = train_teacher(small_params)
    out = small_params.teacher.out
    history = json.load(open(f"{out}/history.json"))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["test_acc"] > 0.4  # 10 classes: chance is 0.1
    raw = torch.load(f"{out}/teacher.pt", weights_only=True)
    ckpt = load_checkpoint(f"{out}/teacher.pt")
    assert ckpt["config"]["teacher"]["model"] == "resnet8"
    model = build_model("resnet8", 1, 10)
    model.load_state_dict(raw["state_dict"])
    assert json.load(open(f"{out}/config.json"))["teacher"]["epochs"] == 2


@pytest.mark.slow
def test_same_seed_same_teacher(small_params, tmp_path):
    first = train_teacher(small_params)
    again = small_params.model_copy(update={"teacher": small_params.teacher.model_copy(update={"out": str(tmp_path / "again")})})
    second = train_teacher(again)
    a = torch.load(f"{small_params.teacher.out}/teacher.pt", weights_only=True)["state_dict"]
    b = torch.load(f"{tmp_path}/again/teacher.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first["test_acc"] == second["test_acc"]
