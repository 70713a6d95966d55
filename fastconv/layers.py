"""Layers with the book's names, constructors, attributes and semantics.

``from fastconv.layers import *`` replaces ``from common.layers import *``.
Convolution, Pooling, Relu and Affine run their kernels on the active
backend (see ``fastconv.kernels``); the others are plain NumPy.

dtypes follow NumPy's promotion of the input and the parameters: float32
images through float64 weights give float64, exactly as in the book, and a
network whose parameters are float32 (``DeepConvNet(dtype=np.float32)``)
stays float32 from end to end. Unlike the book, layers without float64
operands never upcast float32 on their own (the book's im2col and pooling do).
"""
import math

import numpy as np

from fastconv import _checks, kernels
from fastconv.functions import (  # noqa: F401  (re-exported, as the book's module does)
    cross_entropy_error,
    identity_function,
    relu,
    sigmoid,
    softmax,
    step_function,
)
from fastconv.util import col2im, im2col  # noqa: F401

__all__ = [
    "Relu", "Sigmoid", "Affine", "SoftmaxWithLoss", "Dropout", "BatchNormalization",
    "Convolution", "Pooling",
    "softmax", "cross_entropy_error", "sigmoid", "relu", "step_function", "identity_function",
    "im2col", "col2im",
]


def _forward_state(layer, state):
    """``state`` (what forward kept for backward), or a clear error when forward has not run."""
    if state is None:
        raise RuntimeError(f"{type(layer).__name__}.backward needs the state of a forward pass: call forward first")
    return state


def _as(array, dtype):
    """``array`` in ``dtype`` without copying when it already is."""
    return np.asarray(array).astype(dtype, copy=False)


class Relu:
    def __init__(self):
        self.mask = None

    @property
    def mask(self):
        """``x <= 0`` of the last forward (after ``conv_relu_forward``, made from its output on first use)."""
        if self._mask is None and self._fused_output is not None:
            self._mask = _checks.relu_mask(self._fused_output)
        return self._mask

    @mask.setter
    def mask(self, value):
        self._mask = value
        self._fused_output = None

    def forward(self, x):
        out, self.mask = kernels.relu_forward(x)
        return out

    def backward(self, dout):
        return kernels.relu_backward(dout, _forward_state(self, self.mask))


class Sigmoid:
    def __init__(self):
        self.out = None

    def forward(self, x):
        self.out = 1 / (1 + np.exp(-x))
        return self.out

    def backward(self, dout):
        out = _forward_state(self, self.out)
        return dout * (1.0 - out) * out


class Affine:
    def __init__(self, W, b):
        self.W = W
        self.b = b
        self.x = None
        self.original_x_shape = None
        self.dW = None
        self.db = None

    def forward(self, x):
        self.original_x_shape = x.shape
        self.x = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1: ambiguous for an empty batch
        return kernels.affine_forward(self.x, self.W, self.b)

    def backward(self, dout):
        dx, dW, db = kernels.affine_backward(dout, _forward_state(self, self.x), self.W)
        self.dW = _as(dW, np.asarray(self.W).dtype)
        self.db = _as(db, np.asarray(self.b).dtype)
        return dx.reshape(*self.original_x_shape)


class SoftmaxWithLoss:
    def __init__(self):
        self.loss = None
        self.y = None  # softmax output
        self.t = None  # labels: one-hot or class indices

    def forward(self, x, t):
        self.t = t
        self.y = softmax(x)
        self.loss = cross_entropy_error(self.y, self.t)
        return self.loss

    def backward(self, dout=1):
        _forward_state(self, self.y)
        batch_size = self.t.shape[0]
        if self.t.size == self.y.size:  # one-hot labels
            return (self.y - self.t) / batch_size
        dx = self.y.copy()
        dx[np.arange(batch_size), self.t] -= 1
        return dx / batch_size


class Dropout:
    """Dropout as in the book: the mask is ``np.random.rand(*x.shape) > dropout_ratio``."""

    def __init__(self, dropout_ratio=0.5):
        self.dropout_ratio = dropout_ratio
        self.mask = None

    def forward(self, x, train_flg=True):
        if train_flg:
            self.mask = np.random.rand(*x.shape) > self.dropout_ratio
            return x * self.mask
        return x * (1.0 - self.dropout_ratio)

    def backward(self, dout):
        return dout * _forward_state(self, self.mask)


class BatchNormalization:
    """Batch normalization (Ioffe & Szegedy) over the features of each sample."""

    def __init__(self, gamma, beta, momentum=0.9, running_mean=None, running_var=None):
        self.gamma = gamma
        self.beta = beta
        self.momentum = momentum
        self.input_shape = None  # (N, C, H, W) for convolutions, (N, D) for affine layers
        self.running_mean = running_mean
        self.running_var = running_var
        self.batch_size = None
        self.xc = None
        self.xn = None
        self.std = None
        self.dgamma = None
        self.dbeta = None

    def forward(self, x, train_flg=True):
        self.input_shape = x.shape
        out = self._forward(x.reshape(x.shape[0], -1), train_flg)
        return out.reshape(*self.input_shape)

    def _forward(self, x, train_flg):
        if self.running_mean is None:
            self.running_mean = np.zeros(x.shape[1], dtype=x.dtype)
            self.running_var = np.zeros(x.shape[1], dtype=x.dtype)
        if train_flg:
            mu = x.mean(axis=0)
            xc = x - mu
            var = np.mean(xc ** 2, axis=0)
            std = np.sqrt(var + 10e-7)
            xn = xc / std
            self.batch_size = x.shape[0]
            self.xc = xc
            self.xn = xn
            self.std = std
            self.running_mean = self.momentum * self.running_mean + (1 - self.momentum) * mu
            self.running_var = self.momentum * self.running_var + (1 - self.momentum) * var
        else:
            xc = x - self.running_mean
            xn = xc / np.sqrt(self.running_var + 10e-7)
        return self.gamma * xn + self.beta

    def backward(self, dout):
        _forward_state(self, self.xn)
        dx = self._backward(dout.reshape(dout.shape[0], -1))
        return dx.reshape(*self.input_shape)

    def _backward(self, dout):
        self.dbeta = _as(dout.sum(axis=0), np.asarray(self.beta).dtype)
        self.dgamma = _as(np.sum(self.xn * dout, axis=0), np.asarray(self.gamma).dtype)
        dxn = self.gamma * dout
        dxc = dxn / self.std
        dstd = -np.sum((dxn * self.xc) / (self.std * self.std), axis=0)
        dvar = 0.5 * dstd / self.std
        dxc += (2.0 / self.batch_size) * self.xc * dvar
        dmu = np.sum(dxc, axis=0)
        return dxc - dmu / self.batch_size


class Convolution:
    """2-D convolution layer. ``W``: (FN, C, FH, FW), ``b``: (FN,)."""

    def __init__(self, W, b, stride=1, pad=0):
        self.W = W
        self.b = b
        self.stride = stride
        self.pad = pad
        self.x = None
        self.dW = None
        self.db = None
        self._cache = None  # the backend's forward state (and its reusable buffers)

    # The book's intermediate arrays, when the backend keeps them (the reference does).
    col = property(lambda self: getattr(self._cache, "col", None))
    col_W = property(lambda self: getattr(self._cache, "col_W", None))

    def forward(self, x):
        return self._forward(x, relu=False)

    def _forward(self, x, relu, for_backward=True):
        out, self._cache = kernels.conv_forward(x, self.W, self.b, self.stride, self.pad, workspace=self._cache,
                                                relu=relu, for_backward=for_backward)
        self.x = x
        return out

    @property
    def fused_relu(self):
        """Whether the last forward was ``conv_relu_forward``: backward then takes the ReLU's gradient."""
        return getattr(self._cache, "relu_out", None) is not None

    def backward(self, dout, input_gradient=True):
        """dx; sets ``dW`` and ``db``. ``input_gradient=False`` skips dx and returns None: for a
        network's first layer, whose dx nobody reads."""
        dx, dW, db = kernels.conv_backward(dout, _forward_state(self, self._cache), self.W, input_gradient)
        self.dW = _as(dW, np.asarray(self.W).dtype)
        self.db = _as(db, np.asarray(self.b).dtype)
        return dx


def conv_relu_forward(conv, relu, x, for_backward=True):
    """``relu.forward(conv.forward(x))``, with the ReLU done inside the convolution's kernel.

    Saves the ReLU's own pass over memory, forward and backward. Afterwards
    ``conv.backward(dout)`` takes ``dout``, the gradient of the ReLU's output, and
    applies the ReLU's mask itself: call it *instead of* ``relu.backward``
    followed by ``conv.backward`` (``conv.fused_relu`` says which forward ran).
    ``relu.mask`` and ``relu.backward`` still work as after ``relu.forward``.
    The returned array must not be changed before backward: its zeros are the mask.
    ``for_backward=False`` (inference) lets the kernels keep nothing for backward,
    which ``conv.backward`` then refuses.
    """
    out = conv._forward(x, relu=True, for_backward=for_backward)
    relu.mask = None
    relu._fused_output = out
    return out


def conv_relu_pool_inference(conv, relu, pool, x):
    """``pool.forward(relu.forward(conv.forward(x)))`` for inference, in one pass where the backend can:
    the convolution's output is pooled while in cache and never written. Nothing is kept for backward
    (as after ``conv_relu_forward(..., for_backward=False)``; the three layers' backward then say to
    call forward first, or refuse)."""
    pooled, conv._cache = kernels.conv_relu_pool_forward(
        x, conv.W, conv.b, conv.stride, conv.pad, pool.pool_h, pool.pool_w, pool.stride, pool.pad,
        workspace=conv._cache)
    conv.x = x
    relu.mask = None
    pool.x, pool._cache = None, None
    return pooled


class Pooling:
    """Max pooling. With ``pad > 0`` the border is padded with -inf and counted in the output size."""

    def __init__(self, pool_h, pool_w, stride=2, pad=0):
        self.pool_h = pool_h
        self.pool_w = pool_w
        self.stride = stride
        self.pad = pad
        self.x = None
        self._cache = None

    arg_max = property(lambda self: getattr(self._cache, "arg_max", None))

    def forward(self, x):
        out, self._cache = kernels.maxpool_forward(
            x, self.pool_h, self.pool_w, self.stride, self.pad, workspace=self._cache
        )
        self.x = x
        return out

    def backward(self, dout):
        return kernels.maxpool_backward(dout, _forward_state(self, self._cache))
