"""DeepConvNet: parameter save/load round trips and the split of gradient into loss and backward."""
import pickle
import warnings

import numpy as np
import pytest

from fastconv.layers import Dropout
from fastconv.models import DeepConvNet

KEYS = [f"{kind}{i}" for i in range(1, 9) for kind in ("W", "b")]


def network(seed, dtype=np.float64):
    np.random.seed(seed)
    return DeepConvNet(dtype=dtype)


@pytest.fixture
def images():
    return np.random.default_rng(0).random((7, 1, 28, 28)).astype(np.float32)


@pytest.mark.parametrize("suffix", [".npz", ".pkl"])
def test_save_load_round_trip_gives_equal_parameters_and_predictions(tmp_path, images, suffix):
    trained = network(seed=1)
    trained.params["b8"] += 0.25  # the biases start at zero; make them count too
    path = tmp_path / f"params{suffix}"
    trained.save_params(path)

    restored = network(seed=2)
    assert not np.array_equal(restored.predict(images), trained.predict(images))
    restored.load_params(path)
    for key in KEYS:
        assert np.array_equal(restored.params[key], trained.params[key]), key
    assert np.array_equal(restored.predict(images), trained.predict(images))


def test_npz_file_is_readable_without_pickle(tmp_path):
    trained = network(seed=3)
    trained.save_params(tmp_path / "params.npz")
    with np.load(tmp_path / "params.npz", allow_pickle=False) as data:
        assert sorted(data.files) == sorted(KEYS)
        assert np.array_equal(data["W3"], trained.params["W3"])


def test_loads_the_books_pickle_format(tmp_path, images):
    # the book pickles a plain dict of float64 arrays
    source = network(seed=4)
    book_params = {key: np.array(value, dtype=np.float64) for key, value in source.params.items()}
    with open(tmp_path / "deep_convnet_params.pkl", "wb") as f:
        pickle.dump(book_params, f)

    restored = network(seed=5)
    restored.load_params(tmp_path / "deep_convnet_params.pkl")
    assert np.array_equal(restored.predict(images), source.predict(images))


def test_float32_network_loads_float64_parameters(tmp_path, images):
    source = network(seed=6)
    source.save_params(tmp_path / "params.npz")
    single = network(seed=7, dtype=np.float32)
    single.load_params(tmp_path / "params.npz")
    assert all(single.params[key].dtype == np.float32 for key in KEYS)
    out = single.predict(images)
    assert out.dtype == np.float32
    assert np.allclose(out, source.predict(images), rtol=1e-4, atol=1e-4)


def test_loading_checks_names_and_shapes(tmp_path):
    params = dict(network(seed=8).params)
    del params["b5"]
    np.savez(tmp_path / "missing.npz", **params)
    with pytest.raises(KeyError, match="b5"):
        network(seed=9).load_params(tmp_path / "missing.npz")
    params = dict(network(seed=8).params, W7=np.zeros((10, 50)))
    np.savez(tmp_path / "shape.npz", **params)
    with pytest.raises(ValueError, match="W7"):
        network(seed=9).load_params(tmp_path / "shape.npz")


def test_backward_gives_the_numerical_gradient():
    net = network(seed=10)
    for layer in net.layers:
        if isinstance(layer, Dropout):
            layer.dropout_ratio = 0.0  # deterministic loss; every unit kept
    rng = np.random.default_rng(1)
    x = rng.random((3, 1, 28, 28))
    t = np.array([3, 1, 4])

    net.loss(x, t)
    grads = net.backward()
    assert sorted(grads) == sorted(KEYS)
    h = 1e-6
    for key in KEYS:
        # the entry with the largest gradient: away from zero, where ReLU and pooling kinks hide
        index = np.unravel_index(np.abs(grads[key]).argmax(), grads[key].shape)
        param = net.params[key]
        saved = param[index]
        param[index] = saved + h
        up = net.loss(x, t)
        param[index] = saved - h
        down = net.loss(x, t)
        param[index] = saved
        numerical = (up - down) / (2 * h)
        # 1e-4: central differences and the loss's log(y + 1e-7), which backward leaves out
        assert grads[key][index] == pytest.approx(numerical, rel=1e-4), (key, index)


def test_gradient_is_loss_then_backward():
    x = np.random.default_rng(2).random((4, 1, 28, 28))
    t = np.array([0, 9, 2, 7])
    net = network(seed=11)
    np.random.seed(12)
    together = net.gradient(x, t)
    np.random.seed(12)  # same dropout masks
    net.loss(x, t)
    apart = net.backward()
    for key in KEYS:
        assert np.array_equal(together[key], apart[key]), key


def snapshot(net):
    return {key: value.copy() for key, value in net.params.items()}


def assert_unchanged(net, before):
    for key, value in before.items():
        assert np.array_equal(net.params[key], value), key
    for i, index in enumerate(net._PARAM_LAYERS):
        assert net.layers[index].W is net.params[f"W{i + 1}"] and net.layers[index].b is net.params[f"b{i + 1}"]


@pytest.mark.parametrize("damage", ["missing", "shape", "complex", "unknown", "text"])
def test_a_bad_parameter_file_changes_nothing(tmp_path, damage):
    params = {key: value + 1.0 for key, value in network(seed=8).params.items()}  # every key would change
    if damage == "missing":
        del params["b8"]  # the last key: all others would have been assigned before it
    elif damage == "shape":
        params["W8"] = np.zeros((3, 3))
    elif damage == "complex":
        params["b8"] = params["b8"] + 1j
    elif damage == "unknown":
        params["W9"] = np.zeros(3)
    else:
        params["b8"] = np.array(["1"] * params["b8"].size)
    np.savez(tmp_path / "bad.npz", **params)
    target = network(seed=9)
    before = snapshot(target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no ComplexWarning on the way to an error
        with pytest.raises((KeyError, ValueError, TypeError)):
            target.load_params(tmp_path / "bad.npz")
    assert_unchanged(target, before)


def test_npz_names_in_any_case_are_never_unpickled(tmp_path, monkeypatch):
    source = network(seed=10)
    path = tmp_path / "params.NPZ"
    source.save_params(path)
    assert [p.name for p in tmp_path.iterdir()] == ["params.NPZ"]  # no ".npz" appended
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    target = network(seed=11)
    target.load_params(path)
    for key in KEYS:
        assert np.array_equal(target.params[key], source.params[key]), key


@pytest.mark.parametrize("name", ["params", "params.bin", "params.npz.txt"])
def test_names_that_are_neither_npz_nor_pkl_are_refused(tmp_path, monkeypatch, name):
    with open(tmp_path / name, "wb") as f:
        pickle.dump(dict(network(seed=12).params), f)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    target = network(seed=13)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"\.npz .* or \.pkl"):
        target.load_params(tmp_path / name)
    with pytest.raises(ValueError, match=r"\.npz .* or \.pkl"):
        target.save_params(tmp_path / (name + "-out"))
    assert_unchanged(target, before)
