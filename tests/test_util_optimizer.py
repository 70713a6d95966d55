"""fastconv.util, fastconv.functions and fastconv.optimizer against hand-derived values."""
import numpy as np
import pytest

from fastconv import functions, optimizer, util


def test_conv_output_size():
    assert util.conv_output_size(28, 3, stride=1, pad=1) == 28
    assert util.conv_output_size(14, 3, stride=1, pad=2) == 16
    assert util.conv_output_size(7, 3, stride=2, pad=0) == 3


def test_shuffle_dataset_keeps_pairs_together():
    x = np.arange(10 * 3).reshape(10, 3)
    t = np.arange(10)
    xs, ts = util.shuffle_dataset(x, t)
    np.testing.assert_array_equal(xs[:, 0] // 3, ts)
    assert sorted(ts) == list(range(10))
    x4 = np.arange(10).reshape(10, 1, 1, 1)
    xs4, ts4 = util.shuffle_dataset(x4, t)
    np.testing.assert_array_equal(xs4[:, 0, 0, 0], ts4)


def test_smooth_curve_keeps_length_and_constants():
    np.testing.assert_allclose(util.smooth_curve(np.full(30, 2.5)), np.full(30, 2.5))
    noisy = np.sin(np.linspace(0, 3, 50)) + np.random.default_rng(0).normal(0, 0.1, 50)
    smooth = util.smooth_curve(noisy)
    assert smooth.shape == noisy.shape
    assert np.std(np.diff(smooth)) < np.std(np.diff(noisy))


def test_functions_work_on_numpy_2():
    np.testing.assert_array_equal(functions.step_function(np.array([-1.0, 0.0, 2.0])), [0, 0, 1])
    np.testing.assert_allclose(functions.softmax(np.array([1000.0, 1000.0])), [0.5, 0.5])
    np.testing.assert_allclose(functions.softmax(np.log([[1.0, 3.0]])), [[0.25, 0.75]])
    assert functions.sigmoid(0.0) == 0.5
    assert functions.sigmoid_grad(0.0) == 0.25
    np.testing.assert_array_equal(functions.relu(np.array([-2.0, 3.0])), [0.0, 3.0])
    y = np.array([[0.25, 0.75]])
    assert functions.cross_entropy_error(y, np.array([1])) == pytest.approx(-np.log(0.75 + 1e-7))
    assert functions.cross_entropy_error(y, np.array([[0, 1]])) == pytest.approx(-np.log(0.75 + 1e-7))
    assert functions.sum_squared_error(np.array([1.0, 2.0]), np.array([0.0, 0.0])) == 2.5


def _one_step(opt_class, dtype=np.float64, **kwargs):
    params = {"w": np.array([1.0, -2.0], dtype=dtype)}
    grads = {"w": np.array([0.5, -0.25], dtype=dtype)}
    opt = opt_class(**kwargs)
    opt.update(params, grads)
    return params["w"], grads["w"]


def test_optimizers_first_step_by_hand():
    lr = 0.1
    w, g = _one_step(optimizer.SGD, lr=lr)
    np.testing.assert_allclose(w, [1 - lr * 0.5, -2 + lr * 0.25])
    w, _ = _one_step(optimizer.Momentum, lr=lr, momentum=0.9)
    np.testing.assert_allclose(w, [1 - lr * 0.5, -2 + lr * 0.25])
    w, _ = _one_step(optimizer.Nesterov, lr=lr, momentum=0.9)
    # v = -lr g; w += m^2 v - (1 + m) lr g
    np.testing.assert_allclose(w, np.array([1.0, -2.0]) - (0.81 + 1.9) * lr * np.array([0.5, -0.25]))
    w, _ = _one_step(optimizer.AdaGrad, lr=lr)
    np.testing.assert_allclose(w, [1 - lr, -2 + lr], rtol=1e-6)  # g / sqrt(g^2) = sign(g)
    w, _ = _one_step(optimizer.RMSprop, lr=lr, decay_rate=0.99)
    np.testing.assert_allclose(w, [1 - lr / 0.1, -2 + lr / 0.1], atol=1e-5)  # g / sqrt(0.01 g^2)
    w, _ = _one_step(optimizer.Adam, lr=lr)
    # first Adam step moves every weight by about lr against the sign of its gradient
    np.testing.assert_allclose(w, [1 - lr, -2 + lr], rtol=1e-5)


@pytest.mark.parametrize("name", optimizer.__all__)
def test_optimizers_keep_float32(name):
    w, _ = _one_step(getattr(optimizer, name), dtype=np.float32)
    assert w.dtype == np.float32


@pytest.mark.parametrize("name", optimizer.__all__)
def test_optimizers_update_in_place(name):
    w = np.array([1.0, -2.0])
    params = {"w": w}
    getattr(optimizer, name)().update(params, {"w": np.array([0.5, -0.25])})
    assert params["w"] is w and not np.array_equal(w, [1.0, -2.0])
