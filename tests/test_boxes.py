"""Box views (augment kind random_resized_crop): boxes drawn as torchvision draws them, stored in the cache, and
rendered by every consumer at its own size, byte for byte as an independent rendering of the original image."""

import h5py
import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from logitcache.core.config import validate
from logitcache.core.errors import LogitcacheError
from logitcache.core.views import ViewSpec, box_table, center_box, resized_crop_boxes
from logitcache.student.plan import plan_run
from logitcache.student.sources import make_batches
from logitcache.student.train import train_student
from logitcache.teacher.dump import dump_teacher, prepare_split
from logitcache.core.features import load_teacher
from logitcache.core.data import load_split
from logitcache.cache.inspect import describe, verify
from logitcache.student.evaluate import evaluate_checkpoint

RRC = {"kind": "random_resized_crop", "scale": [0.25, 1.0], "ratio": [0.75, 1.3333333333333333], "flip": True,
       "crop_padding": 0}


def draws(spec, size, n):
    sizes = np.array([size])
    return resized_crop_boxes(spec, 7, np.zeros(n, dtype=np.int64), np.arange(n), sizes)


def test_boxes_have_torchvisions_distribution_and_fit_the_image():
    spec = ViewSpec(0, True, kind="random_resized_crop", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    ours = draws(spec, (40, 60), 4000)
    top, left, h, w, flip = (ours[:, i] for i in range(1, 6))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 60).all()
    torch.manual_seed(0)
    image = torch.zeros(1, 40, 60)
    theirs = np.array([v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)])
    for column, name in ((2, "height"), (3, "width")):  # (top, left, height, width) from torchvision
        a, b = (ours[:, 3] if name == "height" else ours[:, 4]), theirs[:, column]
        assert abs(a.mean() - b.mean()) < 0.04 * b.mean(), name
        assert abs(a.std() - b.std()) < 0.08 * b.std(), name
    their_top = (theirs[:, 0] / (40 - theirs[:, 2] + 1)).mean()
    assert abs((top / (40 - h + 1)).mean() - their_top) < 0.03 and 0.45 < flip.mean() < 0.55


def test_no_box_fits_gives_torchvisions_central_fallback():
    spec = ViewSpec(0, False, kind="random_resized_crop", scale=(0.5, 1.0), ratio=(1.0, 1.0))
    ours = draws(spec, (10, 200), 5)[:, 1:5]
    image = torch.zeros(1, 10, 200)
    theirs = v2.RandomResizedCrop.get_params(image, [0.5, 1.0], [1.0, 1.0])  # every try fails: deterministic
    assert (ours == np.array(theirs)).all()


@pytest.mark.parametrize(("h", "w"), [(300, 500), (375, 500), (500, 333), (224, 224)])
def test_the_evaluation_box_is_the_region_resize_then_center_crop_keeps(h, w):
    resize, crop = 256, 224
    resized = TF.resize(torch.zeros(1, h, w), [resize])  # torchvision's shorter-side resize
    rh, rw = resized.shape[-2:]
    top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))  # torchvision's center_crop offsets
    sy, sx = h / rh, w / rw  # original pixels per resized pixel, on each axis
    expected = np.array([top * sy, left * sx, crop * sy, crop * sx])
    ours = center_box(np.array([h]), np.array([w]), resize, crop)[0]
    assert np.abs(ours - expected).max() <= 0.5, (ours, expected)


def rrc_params(data_cfg, teacher_ckpt, out, views=3):
    return validate({"data": data_cfg.model_dump(), "dump": {
        "teacher": str(teacher_ckpt), "out": str(out), "views": views, "workers": 0, "augment": RRC}})


@pytest.fixture(scope="module")
def rrc_cache(data_cfg, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("rrc") / "cache"
    dump_teacher(rrc_params(data_cfg, teacher_ckpt, out))
    return out


def independent(image: torch.Tensor, box, size: int) -> torch.Tensor:
    top, left, height, width, flip = (int(v) for v in box)
    x = TF.resized_crop(image, top, left, height, width, [size, size], interpolation=v2.InterpolationMode.BILINEAR,
                        antialias=True)
    return torch.flip(x, [-1]) if flip else x


def test_the_cache_stores_each_views_box_and_the_teacher_sees_it_at_its_own_size(data_cfg, teacher_ckpt, rrc_cache):
    with h5py.File(rrc_cache / "train.h5") as f:
        boxes = f["views/box"][:]
    train = load_split(data_cfg, "train")
    assert boxes.shape == (len(train), 3, 5) and boxes.dtype == np.int16
    assert (boxes[:, 0] == [0, 0, 28, 28, 0]).all()  # view 0: the evaluation view, the whole 28-pixel image
    job = prepare_split(rrc_params(data_cfg, teacher_ckpt, rrc_cache), load_teacher(teacher_ckpt), "train",
                        torch.device("cpu"))
    for i in (0, 17, 599):
        views = job.dataset[i][0]
        for v in range(3):
            assert torch.equal(views[v], independent(train.images[i], boxes[i, v], 28)), (i, v)


def student(data_cfg, rrc_cache, tmp_path, **settings):
    return validate({"data": data_cfg.model_dump(), "students": {"s": {
        "model": "cnn_tiny", "batch_size": 64, "lr": 0.05, "workers": 0,
        "caches": [str(rrc_cache / "train.h5")], "test_cache": str(rrc_cache / "test.h5"),
        "out": str(tmp_path / "student"), **({"epochs": 1} if "steps" not in settings else {}), **settings}}})


def test_a_student_renders_the_same_boxes_at_its_own_size_byte_for_byte(data_cfg, rrc_cache, tmp_path):
    params = student(data_cfg, rrc_cache, tmp_path, image_size=20)
    plan = plan_run(params, params.students["s"], "s")
    dataset, sampler = make_batches(params.students["s"], plan)
    with h5py.File(rrc_cache / "train.h5") as f:
        boxes = f["views/box"][:]
    sampler.set_epoch(1)
    pairs = next(iter(sampler))
    batch = dataset[pairs]
    assert batch.images.shape[-2:] == (20, 20) and len({v for _, v in pairs}) > 1
    train = load_split(data_cfg, "train")
    expected = torch.stack([independent(train.images[r], boxes[r, v], 20) for r, v in pairs])
    assert torch.equal(batch.images, expected)


def test_a_student_at_its_own_size_and_normalisation_trains_and_records_them(data_cfg, rrc_cache, tmp_path):
    params = student(data_cfg, rrc_cache, tmp_path, image_size=20, mean=[0.5], std=[0.25], steps=4)
    metrics = train_student(params, "s")
    ckpt = torch.load(tmp_path / "student" / "student.pt", weights_only=True)
    info = ckpt["model_info"]
    assert info["box_input"] == {"size": 20, "interpolation": "bilinear", "resize": 28, "crop": 28}
    assert info["normalize"] == {"mean": [0.5], "std": [0.25]}
    assert metrics["test_acc"] is not None and metrics["agreement"] is not None
    again = evaluate_checkpoint(tmp_path / "student" / "student.pt", test_cache=str(rrc_cache / "test.h5"))
    assert again["test_acc"] == metrics["test_acc"] and again["agreement"] == metrics["agreement"]


def test_inspect_recomputes_box_views_from_the_images_and_states_bytes_per_view(data_cfg, teacher_ckpt, rrc_cache):
    report = verify(rrc_cache / "train.h5", teacher_ckpt, data_cfg, samples=16)
    assert report["ok"] and report["max_abs_logit_diff"] < 0.05
    described = describe(rrc_cache / "train.h5")
    assert described["bytes_per_view"] == described["bytes"] / (600 * 3)
    assert described["arrays"]["views/box"] == {"shape": [600, 3, 5], "dtype": "int16", "bytes_per_sample": 30}
    from click.testing import CliRunner

    from logitcache.cli import main

    text = CliRunner().invoke(main, ["inspect", str(rrc_cache / "train.h5")]).output
    assert "views      3 (random, random_resized_crop), evaluation view 0" in text
    assert f"{described['bytes_per_view']:.0f} bytes/view" in text


def test_image_size_with_pad_and_crop_views_is_refused(data_cfg, cache_dir, tmp_path):
    params = student(data_cfg, cache_dir, tmp_path, image_size=20)
    with pytest.raises(LogitcacheError, match="image_size needs box views"):
        plan_run(params, params.students["s"], "s")


def test_box_table_view_zero_is_the_centre_box_and_others_are_drawn():
    spec = ViewSpec(0, True, kind="random_resized_crop")
    sizes = np.array([[300, 500], [500, 333]])
    table = box_table(spec, 0, sizes, 4, (256, 224))
    assert (table[:, 0, 1:5] == center_box(sizes[:, 0], sizes[:, 1], 256, 224)).all()
    assert (table[:, 0, 5] == 0).all() and len({tuple(r) for r in table[:, 1:, 1:5].reshape(-1, 4)}) == 6
