import numpy as np
import pytest
import torch

from logitcache.core.config import AugmentConfig
from logitcache.core.errors import LogitcacheError
from logitcache.core.views import (
    EVAL_SEED,
    RandomViews,
    ViewRenderer,
    ViewSpec,
    crop_flip_codes,
    eval_view,
    pair_params,
    params_from_codes,
    render_batch,
    view_params,
)

SPEC = ViewSpec(padding=2, flip=True)


def test_params_depend_only_on_seed_index_and_view():
    a = view_params(SPEC, 7, np.arange(100), 5)
    b = view_params(SPEC, 7, np.arange(100), 5)
    assert a.shape == (100, 5, 4) and np.array_equal(a, b)
    # a sample's views do not depend on which other samples are asked for
    assert np.array_equal(view_params(SPEC, 7, np.array([42]), 5)[0], a[42])
    assert not np.array_equal(view_params(SPEC, 8, np.arange(100), 5)[:, 1:], a[:, 1:])
    assert a[..., 1:3].min() >= 0 and a[..., 1:3].max() <= 4 and set(np.unique(a[:, 1:, 3])) == {0, 1}


def test_view_zero_is_the_evaluation_view():
    p = view_params(SPEC, 0, np.arange(10), 4)
    assert (p[:, 0] == [EVAL_SEED, 2, 2, 0]).all()
    assert eval_view(p, SPEC) == 0
    assert (view_params(SPEC, 0, np.arange(3), 1) == [EVAL_SEED, 2, 2, 0]).all()


def test_all_enumerates_every_discrete_view_once():
    p = view_params(SPEC, 0, np.arange(3), "all")
    assert p.shape == (3, 50, 4)
    assert len({tuple(row) for row in p[0]}) == 50
    assert p[0, eval_view(p, SPEC)].tolist() == [EVAL_SEED, 2, 2, 0]
    cifar = ViewSpec(padding=4, flip=True)
    assert view_params(cifar, 0, np.arange(1), "all").shape[1] == 162
    with pytest.raises(LogitcacheError, match="finite policy"):
        view_params(ViewSpec(2, True, ({"name": "ColorJitter", "brightness": 0.5},)), 0, np.arange(2), "all")


def test_render_crops_the_padded_image_and_flips():
    image = torch.arange(1 * 6 * 6, dtype=torch.uint8).reshape(1, 6, 6)
    render = ViewRenderer(SPEC)
    assert torch.equal(render(image, [EVAL_SEED, 2, 2, 0]), image)
    shifted = render(image, [EVAL_SEED, 0, 2, 0])  # content moves down by 2, zero rows on top
    assert torch.equal(shifted[:, 2:], image[:, :4]) and shifted[:, :2].sum() == 0
    assert torch.equal(render(image, [EVAL_SEED, 2, 2, 1]), image.flip(-1))


def test_policy_views_replay_bit_identically_and_leave_global_rng_alone():
    spec = ViewSpec.from_config(AugmentConfig(policy=[{"name": "ColorJitter", "brightness": 0.8, "contrast": 0.8}]))
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    params = view_params(spec, 3, np.arange(1), 3)[0]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = [ViewRenderer(spec)(image, p) for p in params]
    assert torch.equal(torch.rand(1), expected_next)
    again = [ViewRenderer(spec)(image, p) for p in params]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], first[2])
    assert torch.equal(first[0], image)  # the evaluation view skips the policy


def test_batch_rendering_equals_per_image_rendering_bit_for_bit():
    from logitcache.core.views import render_batch

    images = torch.randint(0, 256, (40, 3, 9, 7), dtype=torch.uint8)
    for spec in (ViewSpec(2, True), ViewSpec(0, True), ViewSpec(3, False),
                 ViewSpec(1, True, ({"name": "ColorJitter", "brightness": 0.5},))):
        params = view_params(spec, 1, np.arange(40), 5)[np.arange(40), np.arange(40) % 5]
        render = ViewRenderer(spec)
        expected = torch.stack([render(img, p) for img, p in zip(images, params)])
        assert torch.equal(render_batch(render, images, params), expected)


POLICY = ({"name": "ColorJitter", "brightness": 0.5},)


@pytest.mark.parametrize("spec, views, mode", [
    (ViewSpec(2, True), 5, "random"), (ViewSpec(2, True, POLICY), 5, "random"), (ViewSpec(2, True), "all", "all"),
    (ViewSpec(4, True), "all", "all"), (ViewSpec(3, False, POLICY), 1, "eval"), (ViewSpec(11, True, POLICY), 3, "random"),
    (ViewSpec(0, False), 1, "eval")])
def test_stored_codes_give_back_every_view_parameter_exactly(spec, views, mode):
    params = view_params(spec, 9, np.arange(300), views)
    codes = crop_flip_codes(params, spec)
    assert codes.shape == params.shape[:2]
    # one byte a view (down from four int64, 32 bytes) while the codes fit, two beyond 256 of them
    assert codes.dtype == (np.uint8 if (2 * spec.padding + 1) ** 2 * 2 <= 256 else np.uint16)
    assert codes.nbytes == params[..., 0].size * codes.dtype.itemsize <= params.nbytes // 16
    side = 2 * spec.padding + 1
    assert np.array_equal(codes, (params[..., 1] * side + params[..., 2]) * 2 + params[..., 3])
    assert np.array_equal(params_from_codes(codes, spec, 9, mode), params)


def test_derived_seeds_replay_the_policy_bit_identically():
    spec = ViewSpec(2, True, POLICY)
    params = view_params(spec, 4, np.arange(30), 3)
    replayed = params_from_codes(crop_flip_codes(params, spec), spec, 4, "random")
    images = torch.randint(0, 256, (30, 1, 12, 12), dtype=torch.uint8)
    render = ViewRenderer(spec)
    for v in range(3):
        assert torch.equal(render_batch(render, images, replayed[:, v]), render_batch(render, images, params[:, v]))
    other = params_from_codes(crop_flip_codes(params, spec), spec, 5, "random")  # another dump seed: other policies
    assert not torch.equal(render_batch(render, images, other[:, 1]), render_batch(render, images, params[:, 1]))


@pytest.mark.parametrize("spec", [ViewSpec(2, True), ViewSpec(3, False), ViewSpec(1, True, POLICY)])
def test_random_views_render_in_one_batch_as_image_by_image(spec):
    rows = np.array([4, 0, 4, 17, 9, 9])
    views = np.array([3, 3, 2**61, 5, 0, 1])
    params = RandomViews(spec, 7)[rows, views]
    assert params.shape == (6, 4) and np.array_equal(params, RandomViews(spec, 7)[rows, views])
    assert not np.array_equal(params, RandomViews(spec, 8)[rows, views])
    side = 2 * spec.padding + 1
    assert params[:, 1:3].min() >= 0 and params[:, 1:3].max() < side and (spec.flip or not params[:, 3].any())
    # a random view is drawn as a dump draws its views 1..V-1: by the hash of (seed, sample, view) alone
    assert np.array_equal(pair_params(spec, 7, rows[:2], views[:2]), view_params(spec, 7, np.arange(5), 4)[[4, 0], 3])
    images = torch.randint(0, 256, (6, 3, 11, 8), dtype=torch.uint8)
    render = ViewRenderer(spec)
    expected = torch.stack([render(img, p) for img, p in zip(images, params)])
    assert torch.equal(render_batch(render, images, params), expected)


def test_the_normalizer_gives_the_bits_of_torchvisions_to_dtype_then_normalize():
    from torchvision.transforms import v2

    from logitcache.core.views import Normalizer

    images = torch.randint(0, 256, (7, 3, 5, 6), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    assert torch.equal(Normalizer(mean, std)(images), reference(images))
    gray = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.286], [0.353])])
    assert torch.equal(Normalizer([0.286], [0.353])(images[:, :1]), gray(images[:, :1]))
    with pytest.raises(TypeError, match="uint8"):
        Normalizer(mean, std)(images.float())


def test_a_policy_op_with_an_invalid_value_is_refused_when_the_config_is_read():
    from logitcache.core.config import validate
    from logitcache.core.errors import LogitcacheError

    for section in ("teacher", "dump"):
        with pytest.raises(LogitcacheError) as e:
            validate({section: {"augment": {"policy": [{"name": "ColorJitter", "brightness": -5}]}}})
        assert str(e.value).startswith(f"invalid params: {section}.augment.policy: policy op ColorJitter: ")
        assert "\n" not in str(e.value)


def test_more_views_than_a_finite_policy_has_are_refused(data_cfg, teacher_ckpt, tmp_path):
    from click.testing import CliRunner

    from logitcache.cli import main

    result = CliRunner().invoke(main, ["dump-teacher", "--teacher", str(teacher_ckpt), "--views", "51", "--out",
                                       str(tmp_path / "cache"), "-S", f"data.root={data_cfg.root}",
                                       "-S", "data.train_limit=600", "-S", "data.test_limit=300"])
    assert result.exit_code == 2, result.output
    assert result.output == ("error: dump.views=51 asks for more views than the 50 distinct views of this policy "
                             "(crop padding 2, flip True); give at most 50, or views=all\n")
    assert not (tmp_path / "cache").exists()
