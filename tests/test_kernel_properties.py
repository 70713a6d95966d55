"""Property tests: every fast backend computes what the reference backend computes.

For each available backend other than "reference", hypothesis draws batch
size, channels, image size, non-square kernels, strides, pads, dtypes and
memory layouts of the inputs (Fortran order, transposed, strided and
reversed views), runs each kernel through ``fastconv.kernels`` on that
backend and on the reference, and compares the results.

Pure data movement (im2col, max-pool forward, ReLU) must match exactly.
Results that add numbers, where the order of summation may differ, must
satisfy the relative max-norm test of ``conftest.assert_close_to_reference``:

    max |actual - expected| <= rtol * max(1, max |expected|)

with rtol = 1e-12 for float64 and 1e-5 for float32. Pooling inputs are drawn
from a handful of integers so that several cells of a window often share the
maximum, which checks that the first maximum in (ky, kx) order wins.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastconv
from fastconv import kernels
from conftest import FAST_BACKENDS, assert_close_to_reference


PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

LAYOUTS = ["C", "F", "transposed", "strided", "reversed"]


def with_layout(values, layout):
    """The same values in another memory layout (a view that is not C-contiguous, mostly)."""
    if layout == "C":
        return np.ascontiguousarray(values)
    if layout == "F":
        return np.asfortranarray(values)
    if layout == "transposed":
        axes = tuple(reversed(range(values.ndim)))
        return np.ascontiguousarray(values.transpose(axes)).transpose(axes)
    if layout == "strided":
        wide = np.zeros(values.shape[:-1] + (2 * values.shape[-1],), dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "reversed":
        return np.ascontiguousarray(values[..., ::-1])[..., ::-1]
    raise ValueError(layout)


@st.composite
def window_problems(draw, max_pad=2):
    """(N, C, H, W), filter_h, filter_w, stride, pad with at least one window fitting."""
    filter_h = draw(st.integers(1, 4))
    filter_w = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    pad = draw(st.integers(0, max_pad))
    height = draw(st.integers(max(1, filter_h - 2 * pad), max(1, filter_h - 2 * pad) + 7))
    width = draw(st.integers(max(1, filter_w - 2 * pad), max(1, filter_w - 2 * pad) + 7))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), height, width)
    return shape, filter_h, filter_w, stride, pad


@st.composite
def pool_problems(draw):
    """Like window_problems, with pad <= half the pool size, as max pooling requires."""
    shape, pool_h, pool_w, stride, _ = draw(window_problems(max_pad=0))
    pad = draw(st.integers(0, min(pool_h, pool_w) // 2))
    return shape, pool_h, pool_w, stride, pad


dtypes = st.sampled_from([np.float64, np.float32])
layouts = st.sampled_from(LAYOUTS)
seeds = st.integers(0, 2**32 - 1)


def normal(seed, shape, dtype):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def few_integers(seed, shape, dtype):
    """Values from {-2, ..., 2}: many ties inside pooling windows, and zeros for ReLU."""
    return np.random.default_rng(seed).integers(-2, 3, size=shape).astype(dtype)


def on_reference(fn, *args):
    with fastconv.use_backend("reference"):
        return fn(*args)


@pytest.fixture(params=[pytest.param(name, marks=[pytest.mark.slow] if name == "numba" else []) for name in FAST_BACKENDS])
def fast_backend(request):
    """Each fast backend; numba's in the slow set, since it compiles its kernels anew for most geometries
    hypothesis draws."""
    with fastconv.use_backend(request.param):
        yield request.param


@PROPERTY_SETTINGS
@given(problem=window_problems(), dtype=dtypes, layout=layouts, seed=seeds)
def test_im2col_equals_reference(fast_backend, problem, dtype, layout, seed):
    shape, fh, fw, stride, pad = problem
    x = with_layout(normal(seed, shape, dtype), layout)
    expected = on_reference(kernels.im2col, x, fh, fw, stride, pad)
    actual = kernels.im2col(x, fh, fw, stride, pad)
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)


@PROPERTY_SETTINGS
@given(problem=window_problems(), dtype=dtypes, layout=st.sampled_from(["C", "F", "strided"]), seed=seeds)
def test_col2im_equals_reference(fast_backend, problem, dtype, layout, seed):
    shape, fh, fw, stride, pad = problem
    n, c, h, w = shape
    out_h = (h + 2 * pad - fh) // stride + 1
    out_w = (w + 2 * pad - fw) // stride + 1
    col = with_layout(normal(seed, (n * out_h * out_w, c * fh * fw), dtype), layout)
    expected = on_reference(kernels.col2im, col, shape, fh, fw, stride, pad)
    assert_close_to_reference(kernels.col2im(col, shape, fh, fw, stride, pad), expected)


@PROPERTY_SETTINGS
@given(problem=window_problems(), filters=st.integers(1, 4), dtype=dtypes, x_layout=layouts,
       w_layout=layouts, seed=seeds)
def test_conv_forward_and_backward_equal_reference(fast_backend, problem, filters, dtype, x_layout, w_layout, seed):
    shape, fh, fw, stride, pad = problem
    rng = np.random.default_rng(seed)
    x = with_layout(rng.standard_normal(shape).astype(dtype), x_layout)
    W = with_layout(rng.standard_normal((filters, shape[1], fh, fw)).astype(dtype), w_layout)
    b = rng.standard_normal(filters).astype(dtype)

    expected_out, reference_cache = on_reference(kernels.conv_forward, x, W, b, stride, pad)
    out, cache = kernels.conv_forward(x, W, b, stride, pad)
    assert_close_to_reference(out, expected_out)
    assert tuple(cache.x_shape) == shape and cache.dtype == dtype and tuple(cache.out_hw) == out.shape[2:]

    dout = with_layout(rng.standard_normal(out.shape).astype(dtype), x_layout)
    expected = on_reference(kernels.conv_backward, dout, reference_cache, W)
    actual = kernels.conv_backward(dout, cache, W)
    for name, a, e in zip(("dx", "dW", "db"), actual, expected):
        assert a.shape == e.shape, name
        assert_close_to_reference(a, e)


@PROPERTY_SETTINGS
@given(first=window_problems(), second=window_problems(), first_dtype=dtypes, second_dtype=dtypes, seed=seeds)
def test_conv_reusing_a_workspace_of_another_shape_or_dtype(fast_backend, first, second, first_dtype,
                                                            second_dtype, seed):
    """The previous cache comes back as workspace; batch size, image size or dtype may change."""
    rng = np.random.default_rng(seed)
    _, first_cache = kernels.conv_forward(
        rng.standard_normal(first[0]).astype(first_dtype),
        rng.standard_normal((2, first[0][1], first[1], first[2])), np.zeros(2), first[3], first[4])
    shape, fh, fw, stride, pad = second
    x = rng.standard_normal(shape).astype(second_dtype)
    W = rng.standard_normal((3, shape[1], fh, fw)).astype(second_dtype)
    b = rng.standard_normal(3).astype(second_dtype)
    expected_out, reference_cache = on_reference(kernels.conv_forward, x, W, b, stride, pad)
    out, cache = kernels.conv_forward(x, W, b, stride, pad, workspace=first_cache)
    assert_close_to_reference(out, expected_out)
    dout = rng.standard_normal(out.shape).astype(second_dtype)
    expected = on_reference(kernels.conv_backward, dout, reference_cache, W)
    for a, e in zip(kernels.conv_backward(dout, cache, W), expected):
        assert_close_to_reference(a, e)


@PROPERTY_SETTINGS
@given(problem=pool_problems(), dtype=dtypes, layout=layouts, seed=seeds)
def test_maxpool_with_ties_equals_reference(fast_backend, problem, dtype, layout, seed):
    shape, ph, pw, stride, pad = problem
    x = with_layout(few_integers(seed, shape, dtype), layout)
    expected_out, reference_cache = on_reference(kernels.maxpool_forward, x, ph, pw, stride, pad)
    out, cache = kernels.maxpool_forward(x, ph, pw, stride, pad)
    assert out.dtype == expected_out.dtype
    np.testing.assert_array_equal(out, expected_out)
    assert tuple(cache.x_shape) == shape and cache.dtype == dtype and tuple(cache.out_hw) == out.shape[2:]

    dout = with_layout(normal(seed + 1, out.shape, dtype), layout)
    expected_dx = on_reference(kernels.maxpool_backward, dout, reference_cache)
    assert_close_to_reference(kernels.maxpool_backward(dout, cache), expected_dx)


@PROPERTY_SETTINGS
@given(problem=pool_problems(), dtype=dtypes, seed=seeds)
def test_maxpool_with_minus_infinity_and_nan_equals_reference(fast_backend, problem, dtype, seed):
    """-inf ties with the padding (which comes first in the window, and then wins); NaN beats everything."""
    shape, ph, pw, stride, pad = problem
    rng = np.random.default_rng(seed)
    x = few_integers(seed, shape, dtype)
    x[rng.random(shape) < 0.3] = -np.inf
    x[rng.random(shape) < 0.1] = np.nan
    expected_out, reference_cache = on_reference(kernels.maxpool_forward, x, ph, pw, stride, pad)
    out, cache = kernels.maxpool_forward(x, ph, pw, stride, pad)
    np.testing.assert_array_equal(out, expected_out)  # NaN compares equal to NaN here
    dout = normal(seed + 1, out.shape, dtype)
    expected_dx = on_reference(kernels.maxpool_backward, dout, reference_cache)
    assert_close_to_reference(kernels.maxpool_backward(dout, cache), expected_dx)


@PROPERTY_SETTINGS
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple), dtype=dtypes,
       layout=layouts, seed=seeds)
def test_relu_equals_reference(fast_backend, shape, dtype, layout, seed):
    values = few_integers(seed, shape, dtype) * np.asarray(0.5, dtype)
    if values.size:
        values.flat[0] = -0.0
    x = with_layout(values, layout)
    expected_out, expected_mask = on_reference(kernels.relu_forward, x)
    out, mask = kernels.relu_forward(x)
    assert out.dtype == expected_out.dtype and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_array_equal(out, expected_out)
    assert np.array_equal(np.signbit(out), np.signbit(expected_out))  # -0.0 becomes +0.0

    expected_dx = on_reference(kernels.relu_backward, normal(seed, shape, dtype), expected_mask)
    dout = normal(seed, shape, dtype)
    dx = kernels.relu_backward(dout, mask)
    np.testing.assert_array_equal(dx, expected_dx)
    assert dx is dout  # zeroed in place
