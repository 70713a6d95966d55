"""Every layer's backward pass against central differences (float64), on every backend.

The scalar checked is sum(forward(x) * G) for a fixed random G, so its gradient
with respect to the output is G.
"""
import numpy as np
import pytest

from fastconv.layers import (
    Affine, BatchNormalization, Convolution, Dropout, Pooling, Relu, Sigmoid, SoftmaxWithLoss,
)
from gradcheck import assert_gradient, numerical_gradient


def check_layer(layer, x, rng, params=()):
    out = layer.forward(x)
    G = rng.standard_normal(out.shape)
    dx = layer.backward(G.copy())

    def objective():
        return float(np.sum(layer.forward(x) * G))

    assert_gradient(dx, numerical_gradient(objective, x))
    for name, grad_name in params:
        assert_gradient(getattr(layer, grad_name), numerical_gradient(objective, getattr(layer, name)))


def distinct_values(rng, shape):
    """Values far apart so that no max-pool window has a tie within eps."""
    return rng.permutation(np.prod(shape)).reshape(shape) * 0.1 + rng.uniform(0, 0.01, shape)


def test_relu(backend, rng):
    x = rng.standard_normal((3, 7))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    check_layer(Relu(), x, rng)


def test_sigmoid(rng):
    check_layer(Sigmoid(), rng.standard_normal((4, 5)), rng)


def test_affine_on_images(backend, rng):
    layer = Affine(rng.standard_normal((12, 5)), rng.standard_normal(5))
    check_layer(layer, rng.standard_normal((3, 3, 2, 2)), rng, params=[("W", "dW"), ("b", "db")])


def test_dropout_with_fixed_mask(rng):
    layer = Dropout(0.3)
    x = rng.standard_normal((4, 6))
    out = layer.forward(x, train_flg=True)
    G = rng.standard_normal(out.shape)
    dx = layer.backward(G)
    mask = layer.mask.copy()
    assert_gradient(dx, numerical_gradient(lambda: float(np.sum(x * mask * G)), x))


def test_batch_normalization(rng):
    layer = BatchNormalization(rng.standard_normal(6) + 1, rng.standard_normal(6))
    check_layer(layer, rng.standard_normal((5, 6)), rng, params=[("gamma", "dgamma"), ("beta", "dbeta")])


def test_batch_normalization_on_feature_maps(rng):
    layer = BatchNormalization(rng.standard_normal(12) + 1, rng.standard_normal(12))
    check_layer(layer, rng.standard_normal((4, 3, 2, 2)), rng, params=[("gamma", "dgamma"), ("beta", "dbeta")])


@pytest.mark.parametrize("one_hot", [False, True])
def test_softmax_with_loss(rng, one_hot):
    x = rng.standard_normal((4, 5))
    t = np.array([0, 3, 4, 1])
    if one_hot:
        t = np.eye(5)[t]
    layer = SoftmaxWithLoss()
    layer.forward(x, t)
    dx = layer.backward()
    # loose: the book's loss is log(y + 1e-7), whose exact gradient differs from y - t by ~1e-7 / y
    assert_gradient(dx, numerical_gradient(lambda: layer.forward(x, t), x), rtol=2e-5)


@pytest.mark.parametrize("stride,pad,fh,fw", [(1, 0, 3, 3), (1, 1, 3, 3), (2, 1, 3, 2), (1, 2, 2, 2), (3, 0, 1, 1)])
def test_convolution(backend, rng, stride, pad, fh, fw):
    layer = Convolution(rng.standard_normal((4, 3, fh, fw)), rng.standard_normal(4), stride=stride, pad=pad)
    check_layer(layer, rng.standard_normal((2, 3, 6, 5)), rng, params=[("W", "dW"), ("b", "db")])


@pytest.mark.parametrize("ph,pw,stride,pad", [(2, 2, 2, 0), (3, 3, 1, 0), (3, 2, 2, 1), (2, 2, 1, 1), (2, 3, 3, 0)])
def test_pooling(backend, rng, ph, pw, stride, pad):
    layer = Pooling(ph, pw, stride=stride, pad=pad)
    check_layer(layer, distinct_values(rng, (2, 3, 6, 7)), rng)


def test_small_conv_net_parameter_gradients(backend, rng):
    """conv - relu - pool - affine, all parameters against central differences.

    The objective is sum(scores * G) rather than the softmax loss, whose
    log(y + 1e-7) makes the book's analytic gradient (y - t) inexact.
    """
    conv = Convolution(rng.standard_normal((3, 2, 3, 3)) * 0.5, rng.standard_normal(3) * 0.1, stride=1, pad=1)
    relu, pool = Relu(), Pooling(2, 2, stride=2)
    affine = Affine(rng.standard_normal((3 * 3 * 3, 4)) * 0.3, rng.standard_normal(4) * 0.1)
    x = rng.standard_normal((3, 2, 6, 6))
    G = rng.standard_normal((3, 4))

    def loss():
        h = pool.forward(relu.forward(conv.forward(x)))
        return float(np.sum(affine.forward(h) * G))

    loss()
    dout = affine.backward(G.copy())
    conv.backward(relu.backward(pool.backward(dout)))
    for layer, names in ((conv, ("W", "b")), (affine, ("W", "b"))):
        for name in names:
            assert_gradient(getattr(layer, "d" + name), numerical_gradient(loss, getattr(layer, name)), rtol=1e-5)
