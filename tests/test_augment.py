"""Data augmentation: exact identity and shifts, hand-checked rotation and scaling, random batches; elastic
distortions and cut-out."""
import numpy as np
import pytest

from fastconv.app.augment import (Compose, RandomAffine, RandomCutout, RandomElastic, affine_transform, cutout,
                                  elastic_transform)


def hand_made_digit():
    """A 28x28 'L' of ones away from the border, on a zero background."""
    image = np.zeros((28, 28))
    image[8:20, 10] = 1.0
    image[19, 10:17] = 0.5
    return image


@pytest.fixture(params=[(1, 28, 28), (28, 28), (784,)], ids=["nchw", "nhw", "flat"])
def layout(request):
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_identity_returns_the_input(layout, dtype):
    rng = np.random.default_rng(0)
    x = (rng.random((5,) + layout) * 200).astype(dtype)
    out = affine_transform(x, angle=0.0, scale=1.0, shift=(0, 0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert np.array_equal(out, x)
    identity = RandomAffine(shift=0, rotation=0, scale=(1, 1), rng=1)
    assert np.array_equal(identity(x), x)


@pytest.mark.parametrize("dy, dx", [(0, 1), (1, 0), (0, -1), (-1, 0), (2, -3)])
def test_whole_pixel_shift_moves_the_image(dy, dx):
    image = hand_made_digit()
    expected = np.zeros_like(image)
    expected[8 + dy:20 + dy, 10 + dx] = 1.0
    expected[19 + dy, 10 + dx:17 + dx] = 0.5
    out = affine_transform(image[None, None], shift=(dy, dx))[0, 0]
    assert np.array_equal(out, expected)


def test_shift_pushes_pixels_out_and_zeros_in():
    image = np.arange(28 * 28, dtype=np.float64).reshape(28, 28) + 1
    out = affine_transform(image[None], shift=(0, 1))[0]
    assert np.array_equal(out[:, 1:], image[:, :-1])
    assert np.array_equal(out[:, 0], np.zeros(28))


def test_half_pixel_shift_averages_neighbours():
    image = np.zeros((28, 28))
    image[10, 10] = 1.0
    out = affine_transform(image[None], shift=(0, 0.5))[0]
    expected = np.zeros((28, 28))
    expected[10, 10:12] = 0.5
    assert np.allclose(out, expected, atol=1e-15)


def test_quarter_turn_is_rot90_counter_clockwise():
    image = hand_made_digit()
    out = affine_transform(image[None], angle=90.0)[0]
    assert np.allclose(out, np.rot90(image), atol=1e-12)
    back = affine_transform(image[None], angle=-90.0)[0]
    assert np.allclose(back, np.rot90(image, k=-1), atol=1e-12)


def test_scaling_about_the_centre():
    ones = np.ones((1, 28, 28))
    # halving: output pixel p reads input 2 (p - 13.5) + 13.5, inside the image for 6.75 <= p <= 20.25
    half = affine_transform(ones, scale=0.5)[0]
    assert np.array_equal(half[7:21, 7:21], np.ones((14, 14)))
    assert np.array_equal(half[:6], np.zeros((6, 28))) and np.array_equal(half[:, 22:], np.zeros((28, 6)))
    # doubling a centred 2x2 block keeps it and adds a rim fading as the bilinear weights do
    block = np.zeros((1, 28, 28))
    block[0, 13:15, 13:15] = 1.0
    double = affine_transform(block, scale=2.0)[0]
    assert np.array_equal(double[13:15, 13:15], np.ones((2, 2)))
    assert double[12, 12] == pytest.approx(0.75 ** 2) and double[11, 11] == pytest.approx(0.25 ** 2)
    assert double[10].max() == 0


def test_parameters_are_per_image():
    image = hand_made_digit()
    batch = np.stack([image, image])[:, None]
    out = affine_transform(batch, angle=[0.0, 90.0], scale=[1.0, 1.0], shift=[[0, 1], [0, 0]])
    assert np.array_equal(out[0, 0], affine_transform(image[None], shift=(0, 1))[0])
    assert np.allclose(out[1, 0], np.rot90(image), atol=1e-12)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="expected images"):
        affine_transform(np.zeros((2, 3, 28, 28)))
    with pytest.raises(ValueError, match="expected images"):
        affine_transform(np.zeros((2, 783)))
    with pytest.raises(ValueError, match="scale"):
        RandomAffine(scale=(1.1, 0.9))


def blobs(n, rng):
    """Random smooth digit-like images: a few Gaussian blobs each."""
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((n, 28, 28))
    for i in range(n):
        for cy, cx in rng.uniform(8, 20, (3, 2)):
            images[i] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)
    return np.clip(images, 0, 1).astype(np.float32)[:, None]


def test_random_batch_keeps_shapes_dtype_and_each_image_in_its_place():
    rng = np.random.default_rng(3)
    x = blobs(50, rng)
    angle, scale, shift = RandomAffine(rng=7).draw(50)
    out = RandomAffine(rng=7)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and not np.array_equal(out, x)
    # output i is input i under draw i, so labels keep applying in their order
    for i in range(50):
        alone = affine_transform(x[i:i + 1], angle[i], scale[i], shift[i])
        assert np.allclose(out[i], alone[0], atol=1e-6), i


def test_random_parameters_cover_their_ranges():
    angle, scale, shift = RandomAffine(shift=2, rotation=10, scale=(0.9, 1.1), rng=8).draw(2000)
    assert angle.shape == scale.shape == (2000,) and shift.shape == (2000, 2)
    assert -10 <= angle.min() < -9.5 and 9.5 < angle.max() <= 10
    assert 0.9 <= scale.min() < 0.91 and 1.09 < scale.max() <= 1.1
    assert -2 <= shift.min() < -1.9 and 1.9 < shift.max() <= 2


def centroid(images):
    images = images.reshape(len(images), 28, 28).astype(np.float64)
    yy, xx = np.mgrid[:28, :28]
    mass = images.sum(axis=(1, 2))
    return np.stack([(images * yy).sum(axis=(1, 2)) / mass, (images * xx).sum(axis=(1, 2)) / mass], axis=1)


def test_random_shifts_stay_within_their_range():
    x = blobs(200, np.random.default_rng(4))
    out = RandomAffine(shift=2.0, rotation=0.0, scale=(1.0, 1.0), rng=5)(x)
    moved = centroid(out) - centroid(x)
    assert np.abs(moved).max() <= 2.0 + 1e-4
    assert np.abs(moved).max() > 1.5  # the range is used, not just its middle


def test_random_draws_come_from_the_given_generator():
    x = blobs(10, np.random.default_rng(6))
    assert np.array_equal(RandomAffine(rng=11)(x), RandomAffine(rng=np.random.default_rng(11))(x))
    assert not np.array_equal(RandomAffine(rng=11)(x), RandomAffine(rng=12)(x))


# -- elastic distortions -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elastic_distortion_keeps_shape_and_dtype(layout, dtype):
    x = blobs(6, np.random.default_rng(20)).astype(dtype).reshape((6,) + layout)
    out = RandomElastic(alpha=36, sigma=6, rng=1)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and not np.array_equal(out, x)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1 + 1e-6  # bilinear: within the input's range


def test_zero_displacement_is_the_identity_and_a_whole_pixel_one_a_shift():
    x = blobs(4, np.random.default_rng(21))
    assert np.array_equal(elastic_transform(x, 0.0, 0.0), x)
    # every output pixel reads one pixel to its left: the digits move right, as a shift of (0, 1) does
    assert np.array_equal(elastic_transform(x, 0.0, -1.0), affine_transform(x, shift=(0, 1)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elastic_distortion_of_strength_zero_is_the_identity_and_draws_nothing(dtype):
    x = blobs(5, np.random.default_rng(22)).astype(dtype)
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    out = RandomElastic(alpha=0, sigma=6, rng=rng)(x)
    assert out.dtype == x.dtype and np.array_equal(out, x) and out is not x
    assert rng.bit_generator.state == state


def test_elastic_distortions_are_repeatable_under_a_seed():
    x = blobs(8, np.random.default_rng(23))
    assert np.array_equal(RandomElastic(rng=5)(x), RandomElastic(rng=np.random.default_rng(5))(x))
    assert not np.array_equal(RandomElastic(rng=5)(x), RandomElastic(rng=6)(x))


def test_elastic_fields_are_smoothed_noise_scaled_by_alpha():
    dy, dx = RandomElastic(alpha=10, sigma=4, rng=7).draw(200, (28, 28))
    assert dy.shape == dx.shape == (200, 28, 28)
    big_dy, _ = RandomElastic(alpha=20, sigma=4, rng=7).draw(200, (28, 28))
    assert np.allclose(big_dy, 2 * dy)  # the same noise, twice the size
    # smoothing: neighbouring pixels move nearly together, unlike the raw uniform noise
    neighbours = np.corrcoef(dy[:, :, :-1].ravel(), dy[:, :, 1:].ravel())[0, 1]
    assert neighbours > 0.9
    rough, _ = RandomElastic(alpha=10, sigma=0.5, rng=7).draw(200, (28, 28))
    assert np.corrcoef(rough[:, :, :-1].ravel(), rough[:, :, 1:].ravel())[0, 1] < neighbours


def test_elastic_settings_that_make_no_sense_are_refused():
    for alpha, sigma in ((-1, 6), (36, 0), (np.inf, 6)):
        with pytest.raises(ValueError, match="sigma"):
            RandomElastic(alpha, sigma)


# -- cut-out -----------------------------------------------------------------------------------------


def test_cutout_zeros_the_part_of_the_square_inside_the_image():
    ones = np.ones((3, 28, 28))
    out = cutout(ones, top=[5, -3, 24], left=[5, 10, 25], size=[8, 8, 0])
    expected = np.ones((3, 28, 28))
    expected[0, 5:13, 5:13] = 0
    expected[1, 0:5, 10:18] = 0  # rows -3..4: only 5 of them inside
    assert np.array_equal(out, expected) and np.array_equal(ones, np.ones((3, 28, 28)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cutout_keeps_shape_and_dtype_and_cuts_each_image_with_probability_p(layout, dtype):
    x = np.ones((400,) + layout, dtype=dtype)
    out = RandomCutout(size=6, p=0.5, rng=8)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    zeros = (out.reshape(400, -1) == 0).sum(axis=1)
    assert zeros.max() == 36 and set(np.unique(zeros)) <= set(range(0, 37))
    assert 0.4 < np.mean(zeros > 0) < 0.6
    always = RandomCutout(size=6, p=1.0, rng=8)(x)
    assert ((always.reshape(400, -1) == 0).sum(axis=1) > 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cutout_of_size_or_probability_zero_is_the_identity_and_draws_nothing(dtype):
    x = blobs(5, np.random.default_rng(24)).astype(dtype)
    for size, p in ((0, 0.5), (8, 0.0)):
        rng = np.random.default_rng(3)
        state = rng.bit_generator.state
        out = RandomCutout(size=size, p=p, rng=rng)(x)
        assert out.dtype == x.dtype and np.array_equal(out, x) and out is not x
        assert rng.bit_generator.state == state


def test_cutout_is_repeatable_under_a_seed():
    x = blobs(50, np.random.default_rng(25))
    assert np.array_equal(RandomCutout(rng=9)(x), RandomCutout(rng=np.random.default_rng(9))(x))
    assert not np.array_equal(RandomCutout(rng=9)(x), RandomCutout(rng=10)(x))
    with pytest.raises(ValueError, match="size"):
        RandomCutout(size=-1)
    with pytest.raises(ValueError, match="size"):
        RandomCutout(size=4, p=1.5)


def test_compose_applies_its_steps_in_order_from_one_generator():
    x = blobs(10, np.random.default_rng(26))
    rng = np.random.default_rng(12)
    steps = [RandomAffine(rng=rng), RandomElastic(rng=rng), RandomCutout(p=1.0, rng=rng)]
    out = Compose(steps)(x)
    again = np.random.default_rng(12)
    expected = RandomCutout(p=1.0, rng=again)(RandomElastic(rng=again)(RandomAffine(rng=again)(x)))
    assert np.array_equal(out, expected)

