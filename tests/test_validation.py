"""Bad inputs give a clear exception naming the argument, on every backend, before any kernel runs."""
import numpy as np
import pytest

from fastconv import kernels


@pytest.fixture
def x():
    return np.zeros((2, 3, 6, 6))


@pytest.fixture
def W():
    return np.zeros((4, 3, 3, 3))


@pytest.mark.parametrize("call,error,message", [
    (lambda x, W: kernels.im2col(x[0], 3, 3), ValueError, "x must have 4 dimensions"),
    (lambda x, W: kernels.im2col(x.astype(np.int32), 3, 3), TypeError, "x must be a float32 or float64"),
    (lambda x, W: kernels.im2col(x, 0, 3), ValueError, "filter_h must be >= 1"),
    (lambda x, W: kernels.im2col(x, 3, 2.5), TypeError, "filter_w must be an integer"),
    (lambda x, W: kernels.im2col(x, 3, 3, stride=0), ValueError, "stride must be >= 1"),
    (lambda x, W: kernels.im2col(x, 3, 3, stride=True), TypeError, "stride must be an integer"),
    (lambda x, W: kernels.im2col(x, 3, 3, pad=-1), ValueError, "pad must be >= 0"),
    (lambda x, W: kernels.im2col(x, 9, 3), ValueError, "does not fit the height"),
    (lambda x, W: kernels.im2col(x, 3, 9, pad=1), ValueError, "does not fit the width"),
    (lambda x, W: kernels.col2im(np.zeros((5, 27)), x.shape, 3, 3), ValueError, "col must have shape"),
    (lambda x, W: kernels.col2im(np.zeros((32, 27)), (2, 3, 6), 3, 3), ValueError, "input_shape must be 4"),
    (lambda x, W: kernels.col2im(np.zeros((32, 27), np.int8), x.shape, 3, 3), TypeError, "col must be a float32"),
    (lambda x, W: kernels.conv_forward(x, W[:, :2], np.zeros(4)), ValueError, "W has 2 input channels but x has 3"),
    (lambda x, W: kernels.conv_forward(x, W, np.zeros(3)), ValueError, "b must have 4 elements"),
    (lambda x, W: kernels.conv_forward(x, W[0], np.zeros(4)), ValueError, "W must have 4 dimensions"),
    (lambda x, W: kernels.conv_forward(x, W, np.zeros(4), stride=-2), ValueError, "stride must be >= 1"),
    (lambda x, W: kernels.conv_forward(x, W.astype(object), np.zeros(4)), TypeError, "W must be a float32 or float64"),
    (lambda x, W: kernels.conv_forward(x, W, np.zeros(4, object)), TypeError, "b must be a numeric"),
    (lambda x, W: kernels.maxpool_forward(x, 2, 2, stride=2, pad=2), ValueError, "pad must be at most half"),
    (lambda x, W: kernels.maxpool_forward(x, 7, 2), ValueError, "does not fit the height"),
    (lambda x, W: kernels.maxpool_forward(x[..., 0], 2, 2), ValueError, "x must have 4 dimensions"),
    (lambda x, W: kernels.relu_forward(x.astype(np.float16)), TypeError, "x must be a float32 or float64"),
    (lambda x, W: kernels.relu_backward(x, np.zeros((2, 3), bool)), ValueError, "mask must have shape"),
    (lambda x, W: kernels.relu_backward(x, np.zeros(x.shape)), TypeError, "mask must be a boolean"),
])
def test_bad_arguments(backend, x, W, call, error, message):
    with pytest.raises(error, match=message):
        call(x, W)


def test_backward_checks_dout_against_the_forward(backend, x, W):
    out, cache = kernels.conv_forward(x, W, np.zeros(4), stride=1, pad=1)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 4, 6, 6\)"):
        kernels.conv_backward(out[:, :, :5], cache, W)
    out, cache = kernels.maxpool_forward(x, 2, 2, 2, 0)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 3, 3, 3\)"):
        kernels.maxpool_backward(out[:1], cache)
    with pytest.raises(ValueError, match="call forward first"):
        kernels.maxpool_backward(out, None)


def test_non_contiguous_inputs_are_accepted(backend, rng):
    base = rng.standard_normal((6, 5, 3, 2))
    x = base.transpose(3, 2, 0, 1)  # (2, 3, 6, 5), not C-contiguous
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(kernels.im2col(x, 3, 2, 1, 1), kernels.im2col(x.copy(), 3, 2, 1, 1))
    out, _ = kernels.maxpool_forward(x[:, :, ::2], 2, 2, 1, 0)
    ref, _ = kernels.maxpool_forward(np.ascontiguousarray(x[:, :, ::2]), 2, 2, 1, 0)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("call,message", [
    (lambda: kernels.affine_forward(np.zeros((2, 3)), np.zeros((4, 5)), np.zeros(5)), "x has 3 features but W expects 4"),
    (lambda: kernels.affine_forward(np.zeros((2, 4)), np.zeros((4, 5)), np.zeros(4)), "b must have 5 elements"),
    (lambda: kernels.affine_forward(np.zeros((2, 4, 1)), np.zeros((4, 5)), np.zeros(5)), "x must have 2 dimensions"),
    (lambda: kernels.affine_backward(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((4, 5))), r"dout must have shape \(2, 5\)"),
])
def test_affine_bad_arguments(backend, call, message):
    with pytest.raises(ValueError, match=message):
        call()
