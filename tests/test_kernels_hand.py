"""Hand-computed cases for im2col, col2im and max pooling, on every backend."""
import numpy as np
import pytest

from fastconv import kernels


def test_im2col_rows_are_windows_columns_are_channel_then_kernel(backend, dtype):
    x = np.arange(2 * 3 * 3, dtype=dtype).reshape(1, 2, 3, 3)
    col = kernels.im2col(x, 2, 2, stride=1, pad=0)
    c0 = [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    expected = np.array([row + [v + 9 for v in row] for row in c0], dtype=dtype)
    assert col.dtype == dtype
    np.testing.assert_array_equal(col, expected)


def test_im2col_zero_pads_the_border(backend, dtype):
    x = np.array([[[[1, 2], [3, 4]]]], dtype=dtype)
    col = kernels.im2col(x, 2, 2, stride=1, pad=1)
    expected = np.array([
        [0, 0, 0, 1], [0, 0, 1, 2], [0, 0, 2, 0],
        [0, 1, 0, 3], [1, 2, 3, 4], [2, 0, 4, 0],
        [0, 3, 0, 0], [3, 4, 0, 0], [4, 0, 0, 0],
    ], dtype=dtype)
    np.testing.assert_array_equal(col, expected)


def test_im2col_stride_and_non_square_kernel(backend, dtype):
    x = np.arange(2 * 5 * 5, dtype=dtype).reshape(2, 1, 5, 5)
    col = kernels.im2col(x, 1, 3, stride=2, pad=0)
    # out 3x2 per image; window at (y, x) covers row 2y, columns 2x..2x+2
    expected = [[25 * n + 5 * (2 * y) + 2 * xx + k for k in range(3)]
                for n in range(2) for y in range(3) for xx in range(2)]
    np.testing.assert_array_equal(col, np.array(expected, dtype=dtype))


def test_col2im_of_ones_counts_window_overlaps(backend, dtype):
    col = np.ones((4, 4), dtype=dtype)
    img = kernels.col2im(col, (1, 1, 3, 3), 2, 2, stride=1, pad=0)
    np.testing.assert_array_equal(img[0, 0], np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=dtype))
    assert img.dtype == dtype


def test_col2im_drops_the_padding(backend, dtype):
    col = np.ones((9, 4), dtype=dtype)
    img = kernels.col2im(col, (1, 1, 2, 2), 2, 2, stride=1, pad=1)
    np.testing.assert_array_equal(img[0, 0], np.full((2, 2), 4, dtype=dtype))


@pytest.mark.parametrize("stride,pad,fh,fw", [(1, 0, 3, 3), (2, 1, 3, 3), (1, 2, 2, 3), (3, 1, 2, 2)])
def test_col2im_is_the_adjoint_of_im2col(backend, stride, pad, fh, fw, rng):
    # <im2col(x), c> == <x, col2im(c)> holds for the exact adjoint, whatever the geometry
    x = rng.standard_normal((2, 3, 7, 6))
    col = kernels.im2col(x, fh, fw, stride, pad)
    c = rng.standard_normal(col.shape)
    lhs = np.sum(col * c)
    rhs = np.sum(x * kernels.col2im(c, x.shape, fh, fw, stride, pad))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def _pool(x, ph, pw, stride, pad):
    out, cache = kernels.maxpool_forward(x, ph, pw, stride, pad)
    return out, cache


def test_maxpool_forward_and_backward_simple(backend, dtype):
    x = np.array([[[[1, 3, 0, 0], [2, 4, 0, 5], [7, 0, 1, 1], [0, 0, 1, 1]]]], dtype=dtype)
    out, cache = _pool(x, 2, 2, 2, 0)
    np.testing.assert_array_equal(out[0, 0], np.array([[4, 5], [7, 1]], dtype=dtype))
    dout = np.array([[[[10, 20], [30, 40]]]], dtype=dtype)
    dx = kernels.maxpool_backward(dout, cache)
    expected = np.zeros((4, 4), dtype=dtype)
    expected[1, 1], expected[1, 3], expected[2, 0], expected[2, 2] = 10, 20, 30, 40  # ties: first (top-left) one
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_maxpool_ties_send_gradient_to_first_maximum(backend, dtype):
    x = np.full((1, 2, 2, 2), 3, dtype=dtype)
    x[0, 1, 1, 0] = x[0, 1, 1, 1] = 5  # tie in the second row of channel 1
    out, cache = _pool(x, 2, 2, 2, 0)
    dx = kernels.maxpool_backward(np.ones_like(out), cache)
    np.testing.assert_array_equal(dx[0, 0], np.array([[1, 0], [0, 0]], dtype=dtype))
    np.testing.assert_array_equal(dx[0, 1], np.array([[0, 0], [1, 0]], dtype=dtype))


def test_maxpool_2x2_nan_wins_at_any_cell_and_the_first_of_two_wins(backend, dtype):
    """The book's 2 x 2 pooling on a 5 x 5 plane (the last row and column belong to no window)."""
    nan, inf = np.nan, np.inf
    x = np.array([[[[1, nan, 2, 2, 9],
                    [3, 4, nan, nan, 9],
                    [-inf, -inf, 5, 6, 9],
                    [-inf, 0, 7, nan, 9],
                    [9, 9, 9, 9, 9]]]], dtype=dtype)
    out, cache = _pool(x, 2, 2, 2, 0)
    np.testing.assert_array_equal(out[0, 0], np.array([[nan, nan], [0, nan]], dtype=dtype))
    dx = kernels.maxpool_backward(np.array([[[[1, 2], [3, 4]]]], dtype=dtype), cache)
    expected = np.zeros((5, 5), dtype=dtype)
    expected[0, 1], expected[1, 2], expected[3, 1], expected[3, 3] = 1, 2, 3, 4  # the first NaN of two: (1, 2)
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_maxpool_overlapping_windows_sum_gradients(backend, dtype):
    x = np.array([[[[1, 2, 3], [4, 9, 5], [6, 7, 8]]]], dtype=dtype)
    out, cache = _pool(x, 2, 2, 1, 0)
    np.testing.assert_array_equal(out[0, 0], np.full((2, 2), 9, dtype=dtype))
    dx = kernels.maxpool_backward(np.array([[[[1, 2], [3, 4]]]], dtype=dtype), cache)
    expected = np.zeros((3, 3), dtype=dtype)
    expected[1, 1] = 10
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_maxpool_stride_differs_from_pool_size(backend, dtype):
    x = np.arange(25, dtype=dtype).reshape(1, 1, 5, 5)[:, :, ::-1, :].copy()  # maxima at the top-right
    out, cache = _pool(x, 3, 3, 2, 0)
    # window (i, j) covers rows 2i..2i+2 and columns 2j..2j+2; its max is at row 2i, column 2j+2
    np.testing.assert_array_equal(out[0, 0], np.array([[22, 24], [12, 14]], dtype=dtype))
    dx = kernels.maxpool_backward(np.ones_like(out), cache)
    expected = np.zeros((5, 5), dtype=dtype)
    for i in range(2):
        for j in range(2):
            expected[2 * i, 2 * j + 2] += 1
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_maxpool_pad_counts_in_output_and_never_wins(backend, dtype):
    x = np.array([[[[-1, -2], [-3, -4]]]], dtype=dtype)
    out, cache = _pool(x, 2, 2, 2, 1)
    # each 2x2 window holds one real cell and three padded ones: with -inf padding the real cell wins
    np.testing.assert_array_equal(out[0, 0], x[0, 0])
    dx = kernels.maxpool_backward(np.array([[[[1, 2], [3, 4]]]], dtype=dtype), cache)
    np.testing.assert_array_equal(dx[0, 0], np.array([[1, 2], [3, 4]], dtype=dtype))


def test_maxpool_non_square_window(backend, dtype):
    x = np.array([[[[1, 5, 2, 2], [8, 8, 8, 8], [7, 0, 3, 9]]]], dtype=dtype)
    out, cache = _pool(x, 1, 2, 2, 0)  # windows on rows 0 and 2 only
    np.testing.assert_array_equal(out[0, 0], np.array([[5, 2], [7, 9]], dtype=dtype))
    dx = kernels.maxpool_backward(np.ones_like(out), cache)
    np.testing.assert_array_equal(dx[0, 0], np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=dtype))


def test_relu_forward_mask_and_backward_in_place(backend, dtype):
    x = np.array([[-1.0, 0.0, 2.0], [3.0, -0.5, 0.25]], dtype=dtype)
    out, mask = kernels.relu_forward(x)
    np.testing.assert_array_equal(out, np.array([[0, 0, 2], [3, 0, 0.25]], dtype=dtype))
    np.testing.assert_array_equal(mask, x <= 0)
    assert out.dtype == dtype and mask.dtype == np.bool_
    dout = np.arange(6, dtype=dtype).reshape(2, 3) + 1
    dx = kernels.relu_backward(dout, mask)
    np.testing.assert_array_equal(dx, np.array([[0, 0, 3], [4, 0, 6]], dtype=dtype))
    np.testing.assert_array_equal(dout, dx)  # the book's Relu writes into dout


def test_conv_forward_hand_computed(backend, dtype):
    x = np.arange(16, dtype=dtype).reshape(1, 1, 4, 4)
    W = np.array([[[[1, 0], [0, -1]]], [[[0, 1], [1, 0]]]], dtype=dtype)
    b = np.array([0.5, -1], dtype=dtype)
    out, _ = kernels.conv_forward(x, W, b, stride=2, pad=0)
    # filter 0: x[y, x] - x[y+1, x+1] = -5 everywhere; filter 1: x[y, x+1] + x[y+1, x]
    np.testing.assert_array_equal(out[0, 0], np.full((2, 2), -4.5, dtype=dtype))
    np.testing.assert_array_equal(out[0, 1], np.array([[5, 9], [21, 25]], dtype=dtype) - 1)
    assert out.dtype == dtype
