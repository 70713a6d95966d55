"""The chapter-8 network's layer shapes and the fastconv operations timed on them.

Shared by the asv benchmarks and ``python -m bench``. Only the public kernel
interface, layers, model and optimizer are used, so the same code runs
against any commit that asv builds. Every factory returns a callable that
performs the operation once; the backend active when the factory and the
callable run is the one measured.
"""
import zlib
from dataclasses import dataclass

import numpy as np

from fastconv import kernels
from fastconv.layers import Affine, Convolution, Pooling, Relu
from fastconv.models import DeepConvNet
from fastconv.optimizer import Adam

BATCH = 100
INPUT_SHAPE = (1, 28, 28)
INFERENCE_IMAGES = 10_000


def _out_size(size, window, stride, pad):
    return (size + 2 * pad - window) // stride + 1


def _fmt(shape):
    return "x".join(str(d) for d in shape)


@dataclass(frozen=True)
class ConvShape:
    name: str
    x_shape: tuple
    w_shape: tuple
    stride: int
    pad: int

    @property
    def out_hw(self):
        _, _, h, w = self.x_shape
        _, _, fh, fw = self.w_shape
        return _out_size(h, fh, self.stride, self.pad), _out_size(w, fw, self.stride, self.pad)

    @property
    def out_shape(self):
        return (self.x_shape[0], self.w_shape[0]) + self.out_hw

    @property
    def col_shape(self):
        n, c = self.x_shape[:2]
        oh, ow = self.out_hw
        return n * oh * ow, c * self.w_shape[2] * self.w_shape[3]

    @property
    def flops(self):
        """Floating-point operations of the forward product (2 per multiply-add; bias not counted)."""
        rows, inner = self.col_shape
        return 2 * rows * inner * self.w_shape[0]

    @property
    def label(self):
        return f"{_fmt(self.x_shape)} * {_fmt(self.w_shape)} pad {self.pad}"


@dataclass(frozen=True)
class PoolShape:
    name: str
    x_shape: tuple
    pool_h: int
    pool_w: int
    stride: int
    pad: int

    @property
    def out_hw(self):
        _, _, h, w = self.x_shape
        return _out_size(h, self.pool_h, self.stride, self.pad), _out_size(w, self.pool_w, self.stride, self.pad)

    @property
    def out_shape(self):
        return tuple(self.x_shape[:2]) + self.out_hw

    @property
    def label(self):
        return f"{_fmt(self.x_shape)} {self.pool_h}x{self.pool_w}/{self.stride}"


@dataclass(frozen=True)
class ReluShape:
    name: str
    x_shape: tuple

    @property
    def label(self):
        return _fmt(self.x_shape)


@dataclass(frozen=True)
class AffineShape:
    name: str
    x_shape: tuple
    w_shape: tuple

    @property
    def out_shape(self):
        return self.x_shape[0], self.w_shape[1]

    @property
    def flops(self):
        """Floating-point operations of the forward product (bias not counted)."""
        return 2 * self.x_shape[0] * self.w_shape[0] * self.w_shape[1]

    @property
    def label(self):
        return f"{_fmt(self.x_shape)} * {_fmt(self.w_shape)}"


@dataclass(frozen=True)
class NetworkShapes:
    conv: tuple
    pool: tuple
    relu: tuple  # one per distinct activation shape, named after the first layer that has it
    affine: tuple

    def find(self, name):
        for layer in self.conv + self.pool + self.relu + self.affine:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def forward_flops(self):
        """Forward flops of one batch: the products of every convolution and affine layer."""
        return sum(layer.flops for layer in self.conv + self.affine)


def _seeded_network(dtype, seed=0):
    """A DeepConvNet with seeded weights, leaving the global NumPy RNG as it was."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return DeepConvNet(input_dim=INPUT_SHAPE, dtype=dtype)
    finally:
        np.random.set_state(state)


def network_shapes(batch=BATCH):
    """The shapes each kernel sees in ``DeepConvNet`` for a batch, read from the model's layers."""
    net = _seeded_network(np.float64)
    shape = (batch,) + INPUT_SHAPE
    conv, pool, relu, affine = [], [], [], []
    relu_shapes = set()
    for layer in net.layers:
        if isinstance(layer, Convolution):
            W = np.asarray(layer.W)
            item = ConvShape(f"conv{len(conv) + 1}", shape, W.shape, layer.stride, layer.pad)
            conv.append(item)
            shape = item.out_shape
        elif isinstance(layer, Pooling):
            item = PoolShape(f"pool{len(pool) + 1}", shape, layer.pool_h, layer.pool_w, layer.stride, layer.pad)
            pool.append(item)
            shape = item.out_shape
        elif isinstance(layer, Affine):
            W = np.asarray(layer.W)
            item = AffineShape(f"affine{len(affine) + 1}", shape, W.shape)
            affine.append(item)
            shape = item.out_shape
        elif isinstance(layer, Relu):
            index = len(conv) + len(affine)  # relu k follows weight layer k
            if shape not in relu_shapes:
                relu_shapes.add(shape)
                relu.append(ReluShape(f"relu{index}", shape))
    return NetworkShapes(tuple(conv), tuple(pool), tuple(relu), tuple(affine))


# --- input data -------------------------------------------------------------

def _rng(*key):
    """A generator seeded from a name, so every implementation gets the same data."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _normal(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def conv_arrays(shape, dtype):
    """(x, W, b, dout) for a convolution, in ``dtype``; W He-scaled as in the network."""
    rng = _rng("conv", shape.name)
    fan_in = np.prod(shape.w_shape[1:])
    x = _normal(rng, shape.x_shape, dtype)
    W = _normal(rng, shape.w_shape, dtype, np.sqrt(2.0 / fan_in))
    b = _normal(rng, shape.w_shape[:1], dtype, 0.1)
    dout = _normal(rng, shape.out_shape, dtype)
    return x, W, b, dout


def col_array(shape, dtype):
    return _normal(_rng("col", shape.name), shape.col_shape, dtype)


def pool_arrays(shape, dtype):
    rng = _rng("pool", shape.name)
    return _normal(rng, shape.x_shape, dtype), _normal(rng, shape.out_shape, dtype)


def relu_arrays(shape, dtype):
    rng = _rng("relu", shape.name)
    return _normal(rng, shape.x_shape, dtype), _normal(rng, shape.x_shape, dtype)


def affine_arrays(shape, dtype):
    rng = _rng("affine", shape.name)
    x = _normal(rng, shape.x_shape, dtype)
    W = _normal(rng, shape.w_shape, dtype, np.sqrt(2.0 / shape.w_shape[0]))
    b = np.zeros(shape.w_shape[1], dtype=dtype)
    dout = _normal(rng, shape.out_shape, dtype)
    return x, W, b, dout


def image_batch(n_images, dtype):
    """Images in [0, 1) like normalized MNIST, and integer labels."""
    rng = _rng("images", n_images)
    x = rng.random((n_images,) + INPUT_SHAPE).astype(dtype)
    t = rng.integers(0, 10, n_images)
    return x, t


# --- operations -------------------------------------------------------------

def im2col_op(shape, dtype):
    x = conv_arrays(shape, dtype)[0]
    _, _, fh, fw = shape.w_shape
    return lambda: kernels.im2col(x, fh, fw, shape.stride, shape.pad)


def col2im_op(shape, dtype):
    col = col_array(shape, dtype)
    _, _, fh, fw = shape.w_shape
    return lambda: kernels.col2im(col, shape.x_shape, fh, fw, shape.stride, shape.pad)


def conv_forward_op(shape, dtype):
    """Forward passes that hand the previous cache back as workspace, as the layer does."""
    x, W, b, _ = conv_arrays(shape, dtype)
    cache = None

    def run():
        nonlocal cache
        out, cache = kernels.conv_forward(x, W, b, shape.stride, shape.pad, workspace=cache)
        return out

    return run


def conv_backward_op(shape, dtype):
    x, W, b, dout = conv_arrays(shape, dtype)
    _, cache = kernels.conv_forward(x, W, b, shape.stride, shape.pad)
    return lambda: kernels.conv_backward(dout, cache, W)


def maxpool_forward_op(shape, dtype):
    x, _ = pool_arrays(shape, dtype)
    cache = None

    def run():
        nonlocal cache
        out, cache = kernels.maxpool_forward(x, shape.pool_h, shape.pool_w, shape.stride, shape.pad, workspace=cache)
        return out

    return run


def maxpool_backward_op(shape, dtype):
    x, dout = pool_arrays(shape, dtype)
    _, cache = kernels.maxpool_forward(x, shape.pool_h, shape.pool_w, shape.stride, shape.pad)
    return lambda: kernels.maxpool_backward(dout, cache)


def relu_forward_op(shape, dtype):
    x, _ = relu_arrays(shape, dtype)
    return lambda: kernels.relu_forward(x)


def relu_backward_op(shape, dtype):
    x, dout = relu_arrays(shape, dtype)
    _, mask = kernels.relu_forward(x)
    # zeroing in place is idempotent: every call does the same work
    return lambda: kernels.relu_backward(dout, mask)


def affine_forward_op(shape, dtype):
    x, W, b, _ = affine_arrays(shape, dtype)
    layer = Affine(W, b)
    return lambda: layer.forward(x)


def affine_backward_op(shape, dtype):
    x, W, b, dout = affine_arrays(shape, dtype)
    layer = Affine(W, b)
    layer.forward(x)
    return lambda: layer.backward(dout)


def train_step_op(dtype, batch=BATCH):
    """One step of the book's training loop: ``net.gradient`` then ``Adam.update``."""
    net = _seeded_network(dtype)
    optimizer = Adam()
    x, t = image_batch(batch, dtype)

    def run():
        grads = net.gradient(x, t)
        optimizer.update(net.params, grads)

    return run


def inference_ops(dtype, n_images=INFERENCE_IMAGES, batch=BATCH):
    """(predict all images in batches, predict one batch): the second warms a fresh network up."""
    net = _seeded_network(dtype)
    x, _ = image_batch(n_images, dtype)

    def run():
        for start in range(0, n_images, batch):
            net.predict(x[start:start + batch], train_flg=False)

    return run, lambda: net.predict(x[:batch], train_flg=False)


KERNEL_OPS = {
    "im2col": im2col_op,
    "col2im": col2im_op,
    "conv_forward": conv_forward_op,
    "conv_backward": conv_backward_op,
    "maxpool_forward": maxpool_forward_op,
    "maxpool_backward": maxpool_backward_op,
    "relu_forward": relu_forward_op,
    "relu_backward": relu_backward_op,
    "affine_forward": affine_forward_op,
    "affine_backward": affine_backward_op,
}
