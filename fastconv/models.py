"""Networks from the book, built from ``fastconv.layers``."""
import os
import pickle

import numpy as np

from fastconv import _safe_pickle
from fastconv.layers import (
    Affine,
    Convolution,
    Dropout,
    Pooling,
    Relu,
    SoftmaxWithLoss,
    conv_relu_forward,
    conv_relu_pool_inference,
)

__all__ = ["DeepConvNet"]

_DEFAULT_CONVS = (
    {"filter_num": 16, "filter_size": 3, "pad": 1, "stride": 1},
    {"filter_num": 16, "filter_size": 3, "pad": 1, "stride": 1},
    {"filter_num": 32, "filter_size": 3, "pad": 1, "stride": 1},
    {"filter_num": 32, "filter_size": 3, "pad": 2, "stride": 1},
    {"filter_num": 64, "filter_size": 3, "pad": 1, "stride": 1},
    {"filter_num": 64, "filter_size": 3, "pad": 1, "stride": 1},
)


class DeepConvNet:
    """The book's chapter-8 network, about 99.4 % on MNIST.

    conv - relu - conv - relu - pool -
    conv - relu - conv - relu - pool -
    conv - relu - conv - relu - pool -
    affine - relu - dropout - affine - dropout - softmax

    Parameters are ``W1..W8`` and ``b1..b8`` in ``params``, He-initialized
    from ``np.random`` in the book's order, so a seeded network equals the
    book's. ``dtype=np.float32`` keeps parameters and activations in float32.
    """

    def __init__(self, input_dim=(1, 28, 28),
                 conv_param_1=_DEFAULT_CONVS[0], conv_param_2=_DEFAULT_CONVS[1],
                 conv_param_3=_DEFAULT_CONVS[2], conv_param_4=_DEFAULT_CONVS[3],
                 conv_param_5=_DEFAULT_CONVS[4], conv_param_6=_DEFAULT_CONVS[5],
                 hidden_size=50, output_size=10, dtype=np.float64):
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        convs = [conv_param_1, conv_param_2, conv_param_3, conv_param_4, conv_param_5, conv_param_6]
        # fan-in of each weight layer: He initialization scales by sqrt(2 / fan_in)
        in_channels = [input_dim[0]] + [p["filter_num"] for p in convs[:-1]]
        fan_in = [c * p["filter_size"] ** 2 for c, p in zip(in_channels, convs)] + [64 * 4 * 4, hidden_size]
        scales = np.sqrt(2.0 / np.array(fan_in))

        self.params = {}
        channels = input_dim[0]
        for i, p in enumerate(convs):
            self.params[f"W{i + 1}"] = scales[i] * np.random.randn(
                p["filter_num"], channels, p["filter_size"], p["filter_size"])
            self.params[f"b{i + 1}"] = np.zeros(p["filter_num"])
            channels = p["filter_num"]
        self.params["W7"] = scales[6] * np.random.randn(64 * 4 * 4, hidden_size)
        self.params["b7"] = np.zeros(hidden_size)
        self.params["W8"] = scales[7] * np.random.randn(hidden_size, output_size)
        self.params["b8"] = np.zeros(output_size)
        for key, value in self.params.items():
            self.params[key] = value.astype(self.dtype, copy=False)

        p = self.params
        self.layers = []
        for i, conv in enumerate(convs):
            self.layers.append(Convolution(p[f"W{i + 1}"], p[f"b{i + 1}"], conv["stride"], conv["pad"]))
            self.layers.append(Relu())
            if i % 2 == 1:
                self.layers.append(Pooling(pool_h=2, pool_w=2, stride=2))
        self.layers += [
            Affine(p["W7"], p["b7"]), Relu(), Dropout(0.5),
            Affine(p["W8"], p["b8"]), Dropout(0.5),
        ]
        self.last_layer = SoftmaxWithLoss()

    # positions in self.layers of the layers holding W1..W8
    _PARAM_LAYERS = (0, 2, 5, 7, 10, 12, 15, 18)

    def predict(self, x, train_flg=False):
        """The layers in order; each convolution followed by a ReLU runs as one (``conv_relu_forward``).

        With ``train_flg=False`` (inference: no dropout) the convolutions keep nothing for
        backward, which then needs a forward with ``train_flg=True`` (``loss`` runs one), and a
        convolution, its ReLU and the pooling after them run as one (``conv_relu_pool_inference``).
        """
        x = np.asarray(x).astype(self.dtype, copy=False)
        layers, i = self.layers, 0
        while i < len(layers):
            layer = layers[i]
            if (not train_flg and isinstance(layer, Convolution) and i + 2 < len(layers)
                    and isinstance(layers[i + 1], Relu) and isinstance(layers[i + 2], Pooling)):
                x = conv_relu_pool_inference(layer, layers[i + 1], layers[i + 2], x)
                i += 3
                continue
            if isinstance(layer, Convolution) and i + 1 < len(layers) and isinstance(layers[i + 1], Relu):
                x = conv_relu_forward(layer, layers[i + 1], x, for_backward=bool(train_flg))
                i += 2
                continue
            if isinstance(layer, Dropout):
                x = layer.forward(x, train_flg)
            else:
                x = layer.forward(x)
            i += 1
        return x

    def loss(self, x, t):
        y = self.predict(x, train_flg=True)
        return self.last_layer.forward(y, t)

    def accuracy(self, x, t, batch_size=100):
        if t.ndim != 1:
            t = np.argmax(t, axis=1)
        correct = 0
        # unlike the book, a last partial batch is counted too
        for start in range(0, x.shape[0], batch_size):
            y = self.predict(x[start:start + batch_size], train_flg=False)
            correct += np.sum(np.argmax(y, axis=1) == t[start:start + batch_size])
        return correct / x.shape[0]

    def gradient(self, x, t):
        self.loss(x, t)
        return self.backward()

    def backward(self, dout=1):
        """Gradients (``W1..W8``, ``b1..b8``) of the loss computed by the last ``loss`` call.

        ``gradient(x, t)`` is ``loss(x, t)`` followed by ``backward()``; calling
        the two separately lets a training loop time them apart.
        """
        dout = self.last_layer.backward(dout)
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if isinstance(layer, Relu) and i > 0 and getattr(self.layers[i - 1], "fused_relu", False):
                continue  # the convolution before it applies its mask
            if i == 0 and isinstance(layer, Convolution):
                layer.backward(dout, input_gradient=False)  # the images' gradient: nobody reads it
                break
            dout = layer.backward(dout)
        grads = {}
        for i, index in enumerate(self._PARAM_LAYERS):
            grads[f"W{i + 1}"] = self.layers[index].dW
            grads[f"b{i + 1}"] = self.layers[index].db
        return grads

    def save_params(self, file_name="params.pkl"):
        """Save the parameters: ``.npz`` (no pickle) or ``.pkl`` (the book's pickle), by the name's suffix."""
        params = {key: np.asarray(val) for key, val in self.params.items()}
        if _file_format(file_name) == "npz":
            with open(file_name, "wb") as f:  # a file object: np.savez would append .npz to other suffixes
                np.savez(f, **params)
        else:
            with open(file_name, "wb") as f:
                pickle.dump(params, f)

    def load_params(self, file_name="params.pkl", trusted=False):
        """Load parameters saved by ``save_params`` or by the book's code.

        A ``.npz`` file is read without pickle. A ``.pkl`` file is unpickled
        by ``fastconv._safe_pickle``, which rebuilds NumPy arrays of real
        numbers in dicts, lists and tuples and nothing else: a pickle that
        names any other function or class (``os.system``, say), or holds an
        array of objects, is refused with ``RefusedPickle`` (a
        ``pickle.UnpicklingError``) naming it, before anything it names is
        called. ``trusted=True`` unpickles a ``.pkl`` with plain
        ``pickle.load`` instead, which runs whatever the file asks for: for
        files you made yourself or otherwise trust that hold objects other
        than arrays. Other names are refused. Nothing changes unless every
        parameter is valid (see ``set_params``).
        """
        if _file_format(file_name) == "npz":
            with np.load(file_name, allow_pickle=False) as data:
                params = {key: data[key] for key in data.files}
        else:
            with open(file_name, "rb") as f:
                params = pickle.load(f) if trusted else _safe_pickle.load(f)
        self.set_params(params)

    def set_params(self, params):
        """Use ``params`` (``W1..W8``, ``b1..b8``) from now on, cast to this network's dtype.

        All of them are checked first (every name present, no other names,
        real numbers of the right shapes); on any error nothing is replaced.
        """
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
        unknown = sorted(set(params) - set(self.params), key=str)
        if unknown:
            raise KeyError(f"unknown parameters {unknown}; a DeepConvNet has {sorted(self.params)}")
        checked = {}
        for key, current in self.params.items():
            if key not in params:
                raise KeyError(f"parameter {key!r} missing")
            value = np.asarray(params[key])
            if value.dtype.kind not in "fiu":
                raise TypeError(f"parameter {key} must hold real numbers, got dtype {value.dtype}")
            if value.shape != current.shape:
                raise ValueError(f"parameter {key} has shape {value.shape}, expected {current.shape}")
            checked[key] = np.array(value, dtype=self.dtype)
        for i, index in enumerate(self._PARAM_LAYERS):
            for name in ("W", "b"):
                key = f"{name}{i + 1}"
                self.params[key] = checked[key]
                setattr(self.layers[index], name, checked[key])


def _file_format(file_name):
    """"npz" or "pickle", by the suffix of ``file_name`` (any case); other suffixes are a ValueError."""
    suffix = os.path.splitext(os.fspath(file_name))[1].lower()
    if suffix == ".npz":
        return "npz"
    if suffix in (".pkl", ".pickle"):
        return "pickle"
    raise ValueError(f"parameter files are .npz (no pickle) or .pkl (the book's pickle), got {file_name!r}")
