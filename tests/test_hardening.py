"""Misuse that the kernel interface detects, on every backend: a backward that does not match its forward,
caches of another backend or taken over by a later forward, inputs changed in place, empty and
oversized inputs, and results that must not depend on the calling thread."""
import threading

import numpy as np
import pytest

import fastconv
from fastconv import kernels, layers
from fastconv.backends import reference
from fastconv.models import DeepConvNet

from conftest import BACKENDS, assert_close_to_reference


def conv_problem(rng, n=2, c=2, h=7, w=4, fn=3, fh=1, fw=2, dtype=np.float64):
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    W = rng.standard_normal((fn, c, fh, fw)).astype(dtype)
    b = rng.standard_normal(fn).astype(dtype)
    return x, W, b


# --------------------------------------------------------------------------- backward against its forward

def test_backward_rejects_filters_of_another_geometry(backend):
    """Same filter count and C*FH*FW, another filter shape: rejected before any backend code runs."""
    out, cache = kernels.conv_forward(np.ones((2, 2, 7, 4)), np.ones((1, 2, 1, 2)), np.zeros(1), 2, 1)
    for W in (np.ones((1, 2, 2, 1)), np.ones((1, 1, 2, 2)), np.ones((1, 4, 1, 1)), np.ones((2, 2, 1, 2))):
        with pytest.raises(ValueError, match=r"W must have the shape it had in forward, \(1, 2, 1, 2\)"):
            kernels.conv_backward(np.ones(out.shape), cache, W)


def test_backward_rejects_filters_of_a_wider_dtype(backend, rng):
    x, W, b = conv_problem(rng, dtype=np.float32)
    out, cache = kernels.conv_forward(x, W, b, 1, 0)
    with pytest.raises(ValueError, match="W has dtype float64 but the forward computed in float32"):
        kernels.conv_backward(np.ones(out.shape, np.float32), cache, W.astype(np.float64))


def test_a_layer_whose_filters_are_replaced_between_forward_and_backward(backend, rng):
    x, W, b = conv_problem(rng)
    layer = layers.Convolution(W, b, stride=2, pad=1)
    out = layer.forward(x)
    layer.W = rng.standard_normal((3, 2, 2, 1))
    with pytest.raises(ValueError, match="call forward again after replacing W"):
        layer.backward(np.ones(out.shape))
    out = layer.forward(x)  # forward again: fine
    dx = layer.backward(np.ones(out.shape))
    ref_out, ref_cache = reference.conv_forward(x, layer.W, b, 2, 1, None)
    assert_close_to_reference(dx, reference.conv_backward(np.ones(out.shape), ref_cache, layer.W)[0])


# --------------------------------------------------------------------------- caches carry their backend

PAIRS = [(a, b) for a in BACKENDS for b in BACKENDS if a != b]


@pytest.mark.parametrize("first, second", PAIRS)
def test_a_cache_of_another_backend_is_refused_in_backward(first, second, rng):
    x, W, b = conv_problem(rng, n=3, c=2, h=6, w=6, fh=3, fw=3)
    with fastconv.use_backend(first):
        out, cache = kernels.conv_forward(x, W, b, 1, 1)
        pooled, pool_cache = kernels.maxpool_forward(x, 2, 2, 2, 0)
    with fastconv.use_backend(second):
        with pytest.raises(ValueError, match=f"made by the '{first}' backend but the active backend is '{second}'"):
            kernels.conv_backward(np.ones(out.shape), cache, W)
        with pytest.raises(ValueError, match=f"made by the '{first}' backend"):
            kernels.maxpool_backward(np.ones(pooled.shape), pool_cache)


@pytest.mark.parametrize("first, second", PAIRS)
def test_a_workspace_of_another_backend_is_dropped(first, second, rng):
    x, W, b = conv_problem(rng, n=3, c=2, h=6, w=6, fh=3, fw=3)
    with fastconv.use_backend(first):
        _, workspace = kernels.conv_forward(x, W, b, 1, 1)
        _, pool_workspace = kernels.maxpool_forward(x, 2, 2, 2, 0)
    x2 = rng.standard_normal((4, 2, 6, 6))
    dout = rng.standard_normal((4, 3, 6, 6))
    with fastconv.use_backend(second):
        out, cache = kernels.conv_forward(x2, W, b, 1, 1, workspace=workspace)
        grads = kernels.conv_backward(dout, cache, W)
        pooled, pool_cache = kernels.maxpool_forward(x2, 2, 2, 2, 0, workspace=pool_workspace)
        pool_dx = kernels.maxpool_backward(np.ones(pooled.shape), pool_cache)
    ref_out, ref_cache = reference.conv_forward(x2, W, b, 1, 1, None)
    assert_close_to_reference(out, ref_out)
    for got, expected in zip(grads, reference.conv_backward(dout, ref_cache, W)):
        assert_close_to_reference(got, expected)
    ref_pooled, ref_pool_cache = reference.maxpool_forward(x2, 2, 2, 2, 0, None)
    np.testing.assert_array_equal(pooled, ref_pooled)
    np.testing.assert_array_equal(pool_dx, reference.maxpool_backward(np.ones(pooled.shape), ref_pool_cache))


@pytest.mark.parametrize("first, second", PAIRS)
def test_switching_backend_under_a_live_network(first, second):
    rng = np.random.default_rng(3)
    x = rng.random((2, 1, 28, 28))
    t = rng.integers(0, 10, 2)
    np.random.seed(0)
    net = DeepConvNet()
    with fastconv.use_backend("reference"):
        np.random.seed(1)
        expected = net.gradient(x, t)
    with fastconv.use_backend(first):
        np.random.seed(1)
        net.gradient(x, t)
    with fastconv.use_backend(second):
        np.random.seed(1)
        got = net.gradient(x, t)
    for key in expected:
        assert_close_to_reference(got[key], expected[key])


def test_a_cache_from_another_kernel_is_a_type_error(backend, rng):
    x, W, b = conv_problem(rng, h=6, w=6)
    pooled, pool_cache = kernels.maxpool_forward(x, 2, 2, 2, 0)
    out, cache = kernels.conv_forward(x, W, b, 1, 0)
    with pytest.raises(TypeError, match="cache must be the cache conv_forward returned"):
        kernels.conv_backward(np.ones(out.shape), pool_cache, W)
    with pytest.raises(TypeError, match="cache must be the cache maxpool_forward returned"):
        kernels.maxpool_backward(np.ones(pooled.shape), cache)
    with pytest.raises(TypeError, match="cache must be the cache maxpool_forward returned, got dict"):
        kernels.maxpool_backward(np.ones(pooled.shape), {})


# --------------------------------------------------------------------------- caches taken over by a later forward

def test_a_pooling_cache_taken_over_by_a_later_forward_is_refused(backend, rng):
    x1 = rng.standard_normal((2, 3, 6, 6))
    x2 = -x1  # other maxima everywhere
    pooled, cache1 = kernels.maxpool_forward(x1, 2, 2, 2, 0)
    dout = rng.standard_normal(pooled.shape)
    expected = kernels.maxpool_backward(dout, cache1)
    _, cache2 = kernels.maxpool_forward(x2, 2, 2, 2, 0, workspace=cache1)
    with pytest.raises(ValueError, match="passed as workspace to a later forward"):
        kernels.maxpool_backward(dout, cache1)
    # the latest cache routes by its own maxima
    np.testing.assert_array_equal(kernels.maxpool_backward(dout, cache2),
                                  reference.maxpool_backward(dout, reference.maxpool_forward(x2, 2, 2, 2, 0, None)[1]))
    np.testing.assert_array_equal(expected, reference.maxpool_backward(
        dout, reference.maxpool_forward(x1, 2, 2, 2, 0, None)[1]))


def test_a_workspace_given_to_two_forwards_serves_only_the_latest(backend, rng):
    x, W, b = conv_problem(rng, h=6, w=6)
    out, first = kernels.conv_forward(x, W, b, 1, 0)
    _, second = kernels.conv_forward(x, W, b, 1, 0, workspace=first)
    _, third = kernels.conv_forward(2 * x, W, b, 1, 0, workspace=first)
    for stale in (first, second):
        with pytest.raises(ValueError, match="passed as workspace to a later forward"):
            kernels.conv_backward(np.ones(out.shape), stale, W)
    dx, dW, db = kernels.conv_backward(np.ones(out.shape), third, W)
    _, ref_cache = reference.conv_forward(2 * x, W, b, 1, 0, None)
    assert_close_to_reference(dW, reference.conv_backward(np.ones(out.shape), ref_cache, W)[1])


# --------------------------------------------------------------------------- inputs changed in place

@pytest.mark.parametrize("geometry", [(1, 1, 3, 3), (2, 0, 3, 3), (1, 2, 3, 3), (1, 0, 1, 2)],
                         ids=["same", "stride2", "pad2", "stride1pad0"])
def test_changing_x_in_place_after_forward_does_not_change_the_gradients(backend, geometry, rng):
    stride, pad, fh, fw = geometry
    if geometry == (1, 1, 3, 3):  # the direct kernels: a geometry numba has compiled already
        x, W, b = conv_problem(rng, n=3, c=16, h=14, w=14, fn=32, fh=fh, fw=fw)
    else:
        x, W, b = conv_problem(rng, n=3, c=4, h=9, w=8, fn=5, fh=fh, fw=fw)
    original = x.copy()
    out, cache = kernels.conv_forward(x, W, b, stride, pad)
    x[...] = rng.standard_normal(x.shape)
    dout = rng.standard_normal(out.shape)
    got = kernels.conv_backward(dout, cache, W)
    _, ref_cache = reference.conv_forward(original, W, b, stride, pad, None)
    for g, e in zip(got, reference.conv_backward(dout, ref_cache, W)):
        assert_close_to_reference(g, e)


def test_changing_x_in_place_after_pooling_forward_does_not_change_its_gradient(backend, rng):
    x = rng.standard_normal((2, 3, 6, 6))
    original = x.copy()
    pooled, cache = kernels.maxpool_forward(x, 2, 2, 2, 0)
    x[...] = -x
    dout = rng.standard_normal(pooled.shape)
    _, ref_cache = reference.maxpool_forward(original, 2, 2, 2, 0, None)
    np.testing.assert_array_equal(kernels.maxpool_backward(dout, cache), reference.maxpool_backward(dout, ref_cache))


# --------------------------------------------------------------------------- sizes: empty and too large

@pytest.mark.parametrize("n, c, fn", [(0, 2, 3), (2, 2, 0), (0, 2, 0), (2, 0, 3), (0, 0, 0)])
def test_empty_convolutions_give_correctly_shaped_results(backend, n, c, fn, dtype, rng):
    x = rng.standard_normal((n, c, 5, 4)).astype(dtype)
    W = rng.standard_normal((fn, c, 3, 2)).astype(dtype)
    b = rng.standard_normal(fn).astype(dtype)
    out, cache = kernels.conv_forward(x, W, b, 1, 1)
    assert out.shape == (n, fn, 5, 5) and out.dtype == dtype
    # no input channel: every output is its filter's bias
    np.testing.assert_array_equal(out, np.broadcast_to(b[:, None, None], out.shape))
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, dW, db = kernels.conv_backward(dout, cache, W)
    assert dx.shape == x.shape and dW.shape == W.shape and db.shape == (fn,)
    assert dx.dtype == dW.dtype == db.dtype == dtype
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(dW, 0)
    np.testing.assert_allclose(db, dout.sum(axis=(0, 2, 3)), rtol=1e-6)


@pytest.mark.parametrize("n, c", [(0, 3), (2, 0)])
def test_empty_pooling_unfolding_and_relu(backend, n, c, dtype):
    x = np.zeros((n, c, 6, 5), dtype=dtype)
    pooled, cache = kernels.maxpool_forward(x, 2, 2, 2, 1)
    assert pooled.shape == (n, c, 4, 3) and pooled.dtype == dtype
    dx = kernels.maxpool_backward(pooled, cache)
    assert dx.shape == x.shape and dx.dtype == dtype
    col = kernels.im2col(x, 3, 2, 1, 0)
    assert col.shape == (n * 4 * 4, c * 6) and col.dtype == dtype
    folded = kernels.col2im(col, x.shape, 3, 2, 1, 0)
    assert folded.shape == x.shape and folded.dtype == dtype
    out, mask = kernels.relu_forward(x)
    assert out.shape == mask.shape == x.shape
    assert kernels.relu_backward(out, mask).shape == x.shape


def test_layers_take_an_empty_batch(backend):
    np.random.seed(0)
    net = DeepConvNet()
    scores = net.predict(np.zeros((0, 1, 28, 28)))
    assert scores.shape == (0, 10)


def test_empty_images_are_refused(backend):
    with pytest.raises(ValueError, match="H, W >= 1"):
        kernels.im2col(np.zeros((1, 1, 0, 3)), 1, 1, 1, 1)
    with pytest.raises(ValueError, match="H, W >= 1"):
        kernels.maxpool_forward(np.zeros((1, 1, 4, 0)), 2, 2, 2, 1)
    with pytest.raises(ValueError, match="H, W >= 1"):
        kernels.col2im(np.zeros((9, 1)), (1, 1, 0, 1), 1, 1, 1, 1)


def test_pooling_planes_too_large_for_int32_indices_are_refused(backend):
    # a view of one value: nothing of this size is ever allocated
    x = np.broadcast_to(np.float32(0), (1, 1, 2**16, 2**15 + 1))
    with pytest.raises(ValueError, match=r"image planes of at most 2\*\*31 cells"):
        kernels.maxpool_forward(x, 2, 2, 2, 0)


@pytest.mark.parametrize("bad", ["2377", 2.9, None, True, np.float64(3.0)])
def test_col2im_shape_entries_must_be_integers(backend, bad):
    with pytest.raises(TypeError, match="input_shape must be a tuple of 4 ints"):
        kernels.col2im(np.zeros((4, 4)), (1, 1, bad, 3), 2, 2, 1, 0)


def test_col2im_accepts_numpy_integer_shapes(backend):
    img = kernels.col2im(np.ones((4, 4)), np.array([1, 1, 3, 3]), 2, 2, 1, 0)
    np.testing.assert_array_equal(img[0, 0], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


@pytest.mark.parametrize("name", ["stride", "pad", "filter_h"])
def test_huge_geometry_is_a_value_error(backend, name):
    args = {"filter_h": 1, "filter_w": 1, "stride": 1, "pad": 0}
    args[name] = 2**63
    with pytest.raises(ValueError, match=f"{name} must be at most 2147483647"):
        kernels.im2col(np.zeros((1, 1, 3, 3)), **args)
    with pytest.raises(ValueError, match="stride must be at most"):
        kernels.maxpool_forward(np.zeros((1, 1, 4, 4)), 2, 2, stride=2**63)
    with pytest.raises(ValueError, match="stride must be at most"):
        kernels.conv_forward(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 2, 2)), np.zeros(1), stride=2**63)


def test_relu_backward_on_a_read_only_gradient(backend):
    x = np.array([[-1.0, 2.0], [3.0, -4.0]])
    _, mask = kernels.relu_forward(x)
    dout = np.ones_like(x)
    dout.flags.writeable = False
    with pytest.raises(ValueError, match="dout is read-only"):
        kernels.relu_backward(dout, mask)
    # a read-only view that needs a copy anyway (not C-contiguous) works on that copy
    view = np.ones((2, 4))[:, ::2]
    view.flags.writeable = False
    np.testing.assert_array_equal(kernels.relu_backward(view, mask), [[0, 1], [1, 0]])


# --------------------------------------------------------------------------- backward before forward

@pytest.mark.parametrize("make, dout", [
    (lambda: layers.Relu(), np.ones((2, 3))),
    (lambda: layers.Sigmoid(), np.ones((2, 3))),
    (lambda: layers.Affine(np.ones((3, 2)), np.zeros(2)), np.ones((2, 2))),
    (lambda: layers.SoftmaxWithLoss(), 1),
    (lambda: layers.Dropout(), np.ones((2, 3))),
    (lambda: layers.BatchNormalization(np.ones(3), np.zeros(3)), np.ones((2, 3))),
    (lambda: layers.Convolution(np.ones((1, 1, 2, 2)), np.zeros(1)), np.ones((1, 1, 2, 2))),
    (lambda: layers.Pooling(2, 2), np.ones((1, 1, 2, 2))),
], ids=["Relu", "Sigmoid", "Affine", "SoftmaxWithLoss", "Dropout", "BatchNormalization", "Convolution", "Pooling"])
def test_backward_before_forward_says_call_forward_first(backend, make, dout):
    layer = make()
    with pytest.raises(RuntimeError, match=f"{type(layer).__name__}.backward .*call forward first"):
        layer.backward(dout)


def test_kernels_backward_without_a_forward(backend):
    with pytest.raises(ValueError, match="call forward first"):
        kernels.conv_backward(np.ones((1, 1, 2, 2)), None, np.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="call forward first"):
        kernels.relu_backward(np.ones(3), None)


# --------------------------------------------------------------------------- the calling thread

def in_new_thread(function):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", function()))
    thread.start()
    thread.join()
    return result["value"]


@pytest.mark.parametrize("threads", ["1", "2"])
def test_results_do_not_depend_on_the_calling_thread(backend, threads, monkeypatch):
    """The BLAS limit the fast backends hold is set from whichever thread calls them."""
    monkeypatch.setenv("FASTCONV_NUM_THREADS", threads)
    rng = np.random.default_rng(7)
    # shapes whose products gave other last bits on a two-thread BLAS
    x, W, b = conv_problem(rng, n=20, c=16, h=14, w=14, fn=32, fh=3, fw=3)
    a = rng.standard_normal((100, 1024))
    A = rng.standard_normal((1024, 50))

    def run():
        out, cache = kernels.conv_forward(x, W, b, 1, 1)
        return (out, *kernels.conv_backward(np.cos(out), cache, W), kernels.affine_forward(a, A, np.zeros(50)),
                *kernels.affine_backward(np.cos(a[:, :50]), a, A))
    on_main = run()
    on_worker = in_new_thread(run)
    for main_result, worker_result in zip(on_main, on_worker):
        np.testing.assert_array_equal(main_result, worker_result)
