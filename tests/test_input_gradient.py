"""``conv_backward(..., input_gradient=False)``: dW and db without dx (a network's first layer), on every
backend and every path (the one-input-channel kernels, several channels, the geometries the direct kernels
do not take), with and without a fused ReLU: dx is None, dW and db are the bits of the full backward."""
import numpy as np
import pytest

from fastconv import kernels
from fastconv.layers import Convolution

from conftest import conv_problem as problem

# (N, C, K, H, W, FH, FW, stride, pad)
GEOMETRIES = [
    (3, 1, 16, 12, 12, 3, 3, 1, 1),
    (2, 1, 20, 7, 9, 5, 3, 1, 2),
    (2, 6, 9, 8, 6, 3, 2, 1, 0),
    (2, 3, 4, 9, 9, 3, 3, 2, 1),
    (2, 3, 4, 5, 5, 2, 2, 1, 2),
]
IDS = ["N{}C{}K{}_{}x{}_f{}x{}_s{}p{}".format(*g) for g in GEOMETRIES]


@pytest.mark.parametrize("relu", [False, True], ids=["conv", "conv+relu"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_without_dx_gives_the_same_dw_and_db(backend, geometry, relu, dtype, rng):
    x, w, b, stride, pad, dout = problem(rng, geometry, dtype)
    _, cache = kernels.conv_forward(x, w, b, stride, pad, relu=relu)
    dx, dW, db = kernels.conv_backward(dout, cache, w)
    _, again = kernels.conv_forward(x, w, b, stride, pad, relu=relu)
    no_dx, dW_only, db_only = kernels.conv_backward(dout, again, w, input_gradient=False)
    assert dx is not None and dx.shape == x.shape
    assert no_dx is None
    np.testing.assert_array_equal(dW_only, dW)
    np.testing.assert_array_equal(db_only, db)


def test_empty_batch_without_dx(backend):
    _, cache = kernels.conv_forward(np.zeros((0, 1, 5, 5)), np.ones((2, 1, 3, 3)), np.zeros(2), 1, 1)
    dx, dW, db = kernels.conv_backward(np.zeros((0, 2, 5, 5)), cache, np.ones((2, 1, 3, 3)), input_gradient=False)
    assert dx is None
    np.testing.assert_array_equal(dW, np.zeros((2, 1, 3, 3)))
    np.testing.assert_array_equal(db, np.zeros(2))


def test_the_layer_returns_none_and_keeps_its_gradients(backend, dtype, rng):
    x, w, b, stride, pad, dout = problem(rng, GEOMETRIES[0], dtype)
    full, first = Convolution(w, b, stride, pad), Convolution(w, b, stride, pad)
    full.forward(x)
    first.forward(x)
    assert full.backward(dout).shape == x.shape
    assert first.backward(dout, input_gradient=False) is None
    np.testing.assert_array_equal(first.dW, full.dW)
    np.testing.assert_array_equal(first.db, full.db)
    assert first.dW.dtype == dtype and first.db.dtype == dtype
