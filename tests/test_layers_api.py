"""The book's layer API: names, constructors, attributes, dtypes and in-place semantics."""
import inspect

import numpy as np
import pytest

import fastconv
import fastconv.layers as layers
from conftest import assert_close_to_reference
from fastconv import kernels
from fastconv.layers import Affine, BatchNormalization, Convolution, Dropout, Pooling, Relu, Sigmoid, SoftmaxWithLoss


def test_star_import_gives_the_books_layer_names():
    namespace = {}
    exec("from fastconv.layers import *", namespace)
    for name in ("Relu", "Sigmoid", "Affine", "SoftmaxWithLoss", "Dropout", "BatchNormalization",
                 "Convolution", "Pooling", "softmax", "cross_entropy_error", "im2col", "col2im"):
        assert name in namespace, name


@pytest.mark.parametrize("cls,params", [
    (Convolution, ["W", "b", "stride", "pad"]),
    (Pooling, ["pool_h", "pool_w", "stride", "pad"]),
    (Affine, ["W", "b"]),
    (Dropout, ["dropout_ratio"]),
    (BatchNormalization, ["gamma", "beta", "momentum", "running_mean", "running_var"]),
])
def test_constructor_signatures(cls, params):
    assert list(inspect.signature(cls.__init__).parameters)[1:] == params


def test_constructor_defaults():
    assert inspect.signature(Pooling.__init__).parameters["stride"].default == 2
    assert inspect.signature(Pooling.__init__).parameters["pad"].default == 0
    assert inspect.signature(Convolution.__init__).parameters["stride"].default == 1
    assert inspect.signature(Dropout.__init__).parameters["dropout_ratio"].default == 0.5
    assert inspect.signature(BatchNormalization.__init__).parameters["momentum"].default == 0.9


def _conv(rng, dtype=np.float64):
    return Convolution(rng.standard_normal((4, 3, 3, 3)).astype(dtype), np.zeros(4, dtype), stride=1, pad=1)


def test_convolution_attributes(backend, rng):
    conv = _conv(rng)
    x = rng.standard_normal((2, 3, 5, 5))
    out = conv.forward(x)
    assert out.shape == (2, 4, 5, 5)
    assert conv.x is x
    conv.backward(np.ones_like(out))
    assert conv.dW.shape == conv.W.shape and conv.db.shape == conv.b.shape
    for name in ("W", "b", "stride", "pad", "x", "col", "col_W", "dW", "db"):
        assert hasattr(conv, name)


def test_reference_keeps_the_books_caches(rng):
    import fastconv
    with fastconv.use_backend("reference"):
        conv = _conv(rng)
        x = rng.standard_normal((2, 3, 5, 5))
        conv.forward(x)
        np.testing.assert_array_equal(conv.col, kernels.im2col(x, 3, 3, 1, 1))
        np.testing.assert_array_equal(conv.col_W, conv.W.reshape(4, -1).T)
        pool = Pooling(2, 2)
        pool.forward(x)
        assert pool.arg_max.shape == (2 * 3 * 2 * 2,)


def test_layers_use_the_arrays_they_hold_now(backend, rng):
    conv = _conv(rng)
    x = rng.standard_normal((2, 3, 5, 5))
    before = conv.forward(x).copy()
    conv.W *= 2  # an optimizer updating in place
    np.testing.assert_allclose(conv.forward(x), 2 * before, rtol=1e-12, atol=1e-12)
    conv.W = np.zeros_like(conv.W)  # assigned after loading saved parameters
    conv.b = np.full(4, 3.0)
    np.testing.assert_array_equal(conv.forward(x), np.full((2, 4, 5, 5), 3.0))
    affine = Affine(np.ones((3, 2)), np.zeros(2))
    affine.W = np.full((3, 2), 2.0)
    np.testing.assert_array_equal(affine.forward(np.ones((1, 3))), [[6.0, 6.0]])


def test_layers_survive_batch_size_changes(backend, rng):
    conv, pool = _conv(rng), Pooling(2, 2)
    for n in (4, 1, 3):
        x = rng.standard_normal((n, 3, 6, 6))
        out = pool.forward(conv.forward(x))
        dx = conv.backward(pool.backward(np.ones_like(out)))
        assert out.shape == (n, 4, 3, 3) and dx.shape == x.shape


def test_dtype_in_is_dtype_out(backend, dtype, rng):
    x = rng.standard_normal((2, 3, 6, 6)).astype(dtype)
    conv = _conv(rng, dtype)
    chain = [conv, Relu(), Pooling(2, 2)]
    h = x
    for layer in chain:
        h = layer.forward(h)
        assert h.dtype == dtype, type(layer).__name__
    affine = Affine(rng.standard_normal((4 * 3 * 3, 5)).astype(dtype), np.zeros(5, dtype))
    scores = affine.forward(h)
    assert scores.dtype == dtype
    dout = affine.backward(np.ones_like(scores))
    for layer in reversed(chain):
        dout = layer.backward(dout)
        assert dout.dtype == dtype, type(layer).__name__
    assert conv.dW.dtype == dtype and affine.dW.dtype == dtype
    for layer in (Sigmoid(), Dropout()):
        assert layer.forward(x).dtype == dtype and layer.backward(np.ones_like(x)).dtype == dtype
    bn = BatchNormalization(np.ones(3 * 36, dtype), np.zeros(3 * 36, dtype))
    assert bn.forward(x).dtype == dtype and bn.backward(np.ones_like(x)).dtype == dtype


def test_float32_images_through_float64_weights_compute_in_float64(backend, rng):
    """NumPy promotion, as in the book: the book's MNIST loader gives float32 images, its weights are float64."""
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    conv = _conv(rng, np.float64)
    out = conv.forward(x)
    assert out.dtype == np.float64
    with fastconv.use_backend("reference"):
        expected = _conv(np.random.default_rng(12345), np.float64)
    expected.W, expected.b = conv.W, conv.b
    with fastconv.use_backend("reference"):
        assert_close_to_reference(out, expected.forward(x.astype(np.float64)))
    conv.backward(np.ones_like(out))
    assert conv.dW.dtype == np.float64
    assert Affine(np.ones((3, 2)), np.zeros(2)).forward(np.ones((1, 3), np.float32)).dtype == np.float64


@pytest.mark.parametrize("bad", [np.float16, np.int64, np.uint8, np.complex128])
def test_other_dtypes_are_a_clear_error(backend, bad, rng):
    x = (rng.standard_normal((1, 3, 5, 5)) * 10).astype(bad)
    with pytest.raises(TypeError, match="x must be a float32 or float64 array"):
        _conv(rng).forward(x)
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        Pooling(2, 2).forward(x)
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        Relu().forward(x)


def test_relu_backward_writes_into_dout(backend, rng):
    relu = Relu()
    x = rng.standard_normal((3, 4))
    relu.forward(x)
    dout = np.ones((3, 4))
    dx = relu.backward(dout)
    np.testing.assert_array_equal(dout, (x > 0).astype(float))
    np.testing.assert_array_equal(dx, dout)
    np.testing.assert_array_equal(relu.mask, x <= 0)


def test_dropout_mask_is_the_books_draw():
    x = np.ones((3, 4))
    np.random.seed(7)
    out = Dropout(0.4).forward(x, train_flg=True)
    np.random.seed(7)
    expected_mask = np.random.rand(3, 4) > 0.4
    np.testing.assert_array_equal(out, x * expected_mask)
    np.testing.assert_array_equal(Dropout(0.4).forward(x, train_flg=False), x * 0.6)


def test_softmax_with_loss_matches_hand_computation():
    x = np.array([[0.0, np.log(3.0)]])  # softmax = [1/4, 3/4]
    layer = SoftmaxWithLoss()
    loss = layer.forward(x, np.array([1]))
    assert loss == pytest.approx(-np.log(0.75 + 1e-7))
    np.testing.assert_allclose(layer.backward(), [[0.25, -0.25]])
    assert layer.forward(x, np.array([[0.0, 1.0]])) == pytest.approx(loss)


def test_batch_normalization_running_statistics():
    bn = BatchNormalization(np.ones(2), np.zeros(2), momentum=0.5)
    x = np.array([[1.0, 10.0], [3.0, 30.0]])
    out = bn.forward(x, train_flg=True)
    np.testing.assert_allclose(out, [[-1, -1], [1, 1]], atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, [1.0, 10.0])  # 0.5 * 0 + 0.5 * mean
    np.testing.assert_allclose(bn.running_var, [0.5, 50.0])
    np.testing.assert_allclose(bn.forward(x, train_flg=False), (x - [1, 10]) / np.sqrt([0.5, 50] + np.float64(1e-6)))


def test_pooling_with_pad_output_size(backend, rng):
    out = Pooling(3, 3, stride=2, pad=1).forward(rng.standard_normal((2, 3, 7, 7)))
    assert out.shape == (2, 3, 4, 4)


def test_module_mirrors_the_book():
    assert layers.Pooling is Pooling
    for module in ("layers", "util", "functions", "optimizer", "trainer", "models"):
        __import__(f"fastconv.{module}")
