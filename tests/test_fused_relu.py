"""A convolution followed by a ReLU in one pass (``conv_forward(relu=True)``, ``conv_relu_forward``), on
every backend: the same results as the two layers one after the other, on every path (direct kernels,
and the geometries they do not take), and in the book's network."""
import numpy as np
import pytest

from fastconv import kernels
from fastconv.layers import Convolution, Relu, conv_relu_forward
from fastconv.models import DeepConvNet

from conftest import NUMBA_GEOMETRIES, assert_close_to_reference, conv_problem as problem, conv_relu_reference

# (N, C, K, H, W, FH, FW, stride, pad): direct kernels (one input channel, several), stride 2 and a pad as
# large as the filter (other paths)
GEOMETRIES = [
    (3, 1, 16, 12, 12, 3, 3, 1, 1),
    (2, 16, 32, 9, 9, 3, 3, 1, 2),
    (2, 5, 7, 8, 6, 3, 2, 1, 0),
    (2, 3, 4, 9, 9, 3, 3, 2, 1),
    (2, 3, 4, 5, 5, 2, 2, 1, 2),
]
IDS = ["N{}C{}K{}_{}x{}_f{}x{}_s{}p{}".format(*g) for g in GEOMETRIES]


def unfused(x, w, b, stride, pad, dout):
    """The two layers' kernels one after the other, on the active backend."""
    conv, cache = kernels.conv_forward(x, w, b, stride, pad)
    out, mask = kernels.relu_forward(conv)
    return (out,) + tuple(kernels.conv_backward(kernels.relu_backward(dout.copy(), mask), cache, w))


def fused(x, w, b, stride, pad, dout):
    out, cache = kernels.conv_forward(x, w, b, stride, pad, relu=True)
    return (out,) + tuple(kernels.conv_backward(dout, cache, w))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_fused_equals_the_two_kernels_bit_for_bit_and_the_reference(backend, geometry, dtype, rng):
    case = problem(rng, geometry, dtype)
    got = fused(*case)
    for value, separate in zip(got, unfused(*case)):
        assert value.dtype == dtype
        np.testing.assert_array_equal(value, separate)
    for value, expected in zip(got, conv_relu_reference(*case)):
        assert_close_to_reference(value, expected, dtype)


def test_nan_passes_through_as_in_the_books_relu(backend, dtype, rng):
    """The book's mask is x <= 0, false for NaN: a NaN output stays NaN and lets its gradient through."""
    x, w, b, stride, pad, dout = problem(rng, GEOMETRIES[1], dtype)
    x[0, 3, 4, 4] = np.nan
    got = fused(x, w, b, stride, pad, dout)
    assert np.isnan(got[0]).any()
    for value, separate in zip(got, unfused(x, w, b, stride, pad, dout)):
        np.testing.assert_array_equal(value, separate)


def test_backward_leaves_the_callers_dout_alone(backend, rng):
    x, w, b, stride, pad, dout = problem(rng, GEOMETRIES[0], np.float64)
    keep = dout.copy()
    _, cache = kernels.conv_forward(x, w, b, stride, pad, relu=True)
    kernels.conv_backward(dout, cache, w)
    np.testing.assert_array_equal(dout, keep)


@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (2, 0, 5, 5)], ids=["no images", "no channels"])
def test_empty_inputs(backend, shape):
    x = np.ones(shape)
    w = np.ones((4, shape[1], 3, 3))
    b = np.array([-1.0, 0.0, 2.0, 3.0])
    dout = np.ones((shape[0], 4, 5, 5))
    out, dx, dW, db = fused(x, w, b, 1, 1, dout)
    # no products: the output is the bias through the ReLU, and only positive biases pass gradients
    np.testing.assert_array_equal(out, np.broadcast_to(np.array([0.0, 0.0, 2.0, 3.0])[:, None, None], out.shape))
    np.testing.assert_array_equal(dx, np.zeros(shape))
    np.testing.assert_array_equal(dW, np.zeros(w.shape))
    np.testing.assert_array_equal(db, np.array([0.0, 0.0, 1.0, 1.0]) * shape[0] * 25)


def test_relu_must_be_a_bool(backend):
    with pytest.raises(TypeError, match="relu must be True or False"):
        kernels.conv_forward(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), np.zeros(1), relu="yes")


def test_layers_keep_their_state_after_the_fused_forward(backend, dtype, rng):
    """After conv_relu_forward, the ReLU's mask and backward are those of its own forward."""
    x, w, b, stride, pad, dout = problem(rng, NUMBA_GEOMETRIES[1], dtype)  # kernels numba has compiled already
    conv, relu = Convolution(w, b, stride, pad), Relu()
    out = conv_relu_forward(conv, relu, x)
    assert conv.fused_relu
    separate_conv, separate_relu = Convolution(w, b, stride, pad), Relu()
    np.testing.assert_array_equal(out, separate_relu.forward(separate_conv.forward(x)))
    assert not separate_conv.fused_relu
    np.testing.assert_array_equal(relu.mask, separate_relu.mask)
    np.testing.assert_array_equal(relu.backward(dout.copy()), separate_relu.backward(dout.copy()))
    np.testing.assert_array_equal(conv.backward(dout), separate_conv.backward(separate_relu.backward(dout.copy())))
    np.testing.assert_array_equal(conv.dW, separate_conv.dW)
    np.testing.assert_array_equal(conv.db, separate_conv.db)
    conv.forward(x)
    assert not conv.fused_relu


def test_the_network_gives_what_its_layers_give_one_by_one(backend, dtype):
    """DeepConvNet fuses each convolution with its ReLU; the book's loop over the layers gives the same bits."""
    np.random.seed(3)
    net = DeepConvNet(dtype=dtype)
    x = np.random.rand(4, 1, 28, 28).astype(dtype)
    t = np.array([1, 5, 0, 9])
    np.random.seed(4)  # the same dropout masks both times
    loss = net.loss(x, t)
    grads = net.backward()
    assert all(net.layers[i].fused_relu for i in (0, 2, 5, 7, 10, 12))

    y = x
    np.random.seed(4)
    for layer in net.layers:  # the book's DeepConvNet.predict, with new layer objects of the same parameters
        y = layer.forward(y, True) if type(layer).__name__ == "Dropout" else layer.forward(y)
    assert not net.layers[0].fused_relu
    assert net.last_layer.forward(y, t) == loss
    dout = net.last_layer.backward(1)
    for layer in reversed(net.layers):
        dout = layer.backward(dout)
    for i, index in enumerate(net._PARAM_LAYERS):
        np.testing.assert_array_equal(net.layers[index].dW, grads[f"W{i + 1}"])
        np.testing.assert_array_equal(net.layers[index].db, grads[f"b{i + 1}"])


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_a_forward_without_backward_gives_the_same_output_and_refuses_backward(backend, geometry, dtype, rng):
    x, w, b, stride, pad, dout = problem(rng, geometry, dtype)
    for relu in (False, True):
        kept, cache = kernels.conv_forward(x, w, b, stride, pad, relu=relu)
        inference, inference_cache = kernels.conv_forward(x, w, b, stride, pad, relu=relu, for_backward=False)
        np.testing.assert_array_equal(inference, kept)
        with pytest.raises(ValueError, match="for_backward=False"):
            kernels.conv_backward(dout, inference_cache, w)
        # its buffers go on to the next forward, which trains as usual
        again, again_cache = kernels.conv_forward(x, w, b, stride, pad, workspace=inference_cache, relu=relu)
        np.testing.assert_array_equal(again, kept)
        for got, expected in zip(kernels.conv_backward(dout, again_cache, w), kernels.conv_backward(dout, cache, w)):
            np.testing.assert_array_equal(got, expected)


def test_for_backward_must_be_a_bool(backend):
    with pytest.raises(TypeError, match="for_backward must be True or False"):
        kernels.conv_forward(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), np.zeros(1), for_backward=None)


def test_inference_between_training_steps_changes_nothing(backend):
    """predict(train_flg=False) keeps nothing for backward; the next loss and backward are as without it."""
    np.random.seed(6)
    net = DeepConvNet()
    x = np.random.rand(3, 1, 28, 28)
    t = np.array([2, 7, 1])
    np.random.seed(7)
    net.loss(x, t)
    expected = net.backward()
    expected = {key: value.copy() for key, value in expected.items()}
    y = net.predict(x[:2], train_flg=False)
    np.random.seed(8)
    reference_net = DeepConvNet()
    reference_net.set_params(net.params)
    y_layers = x[:2]
    for layer in reference_net.layers:  # the layers one by one, each keeping its state
        y_layers = layer.forward(y_layers, False) if type(layer).__name__ == "Dropout" else layer.forward(y_layers)
    np.testing.assert_array_equal(y, y_layers)
    np.random.seed(7)
    net.loss(x, t)
    for key, value in net.backward().items():
        np.testing.assert_array_equal(value, expected[key])


# (conv geometry, pool window (h, w, stride, pad)): the book's pooling on even and odd outputs, and paths
# the fused kernels leave to the separate pooling (other windows, a strided convolution)
POOLED = [(GEOMETRIES[0], (2, 2, 2, 0)), (GEOMETRIES[1], (2, 2, 2, 0)), (GEOMETRIES[2], (2, 2, 2, 0)),
          ((2, 6, 8, 7, 7, 3, 3, 1, 1), (2, 2, 2, 0)), (GEOMETRIES[1], (3, 3, 2, 1)), (GEOMETRIES[3], (2, 2, 2, 0))]


@pytest.mark.parametrize("geometry,window", POOLED, ids=[f"{IDS[GEOMETRIES.index(g)] if g in GEOMETRIES else 'odd'}"
                                                        f"-pool{w[0]}x{w[1]}s{w[2]}p{w[3]}" for g, w in POOLED])
def test_inference_through_convolution_relu_and_pooling_equals_the_three_kernels(backend, geometry, window, dtype,
                                                                                 rng):
    x, w, b, stride, pad, dout = problem(rng, geometry, dtype)
    x[0, 0, 1, 1] = np.nan
    out, _ = kernels.conv_forward(x, w, b, stride, pad, relu=True, for_backward=False)
    expected, _ = kernels.maxpool_forward(out, *window)
    pooled, cache = kernels.conv_relu_pool_forward(x, w, b, stride, pad, *window)
    assert pooled.dtype == dtype
    np.testing.assert_array_equal(pooled, expected)
    with pytest.raises(ValueError, match="for_backward=False"):
        kernels.conv_backward(dout, cache, w)
    # the next forward takes its buffers and trains as usual
    again, again_cache = kernels.conv_forward(x, w, b, stride, pad, workspace=cache, relu=True)
    np.testing.assert_array_equal(again, out)
    kernels.conv_backward(dout, again_cache, w)


def test_inference_through_pooling_checks_the_pooling(backend):
    with pytest.raises(ValueError, match="pad must be at most half the pool size"):
        kernels.conv_relu_pool_forward(np.ones((1, 1, 6, 6)), np.ones((2, 1, 3, 3)), np.zeros(2), 1, 1, 2, 2, 2, 2)
