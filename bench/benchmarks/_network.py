"""The fastconv operations timed at the chapter-8 network's shapes.

Shared by the asv benchmarks and ``python -m bench``. Only the public kernel
interface, layers, model and optimizer are used, so the same code runs
against any commit that asv builds. Every factory returns a callable that
performs the operation once; the backend active when the factory and the
callable run is the one measured.
"""
import numpy as np

import fastconv
from fastconv import kernels
from fastconv.layers import Affine, Convolution, Dropout, Pooling, Relu
from fastconv.models import DeepConvNet
from fastconv.optimizer import Adam

from ._shapes import (  # noqa: F401  (re-exported for the asv suite and the report)
    BATCH, INFERENCE_IMAGES, INPUT_SHAPE, AffineShape, ConvShape, NetworkShapes, PoolShape, ReluShape,
    affine_arrays, col_array, conv_arrays, image_batch, pool_arrays, relu_arrays,
)


def _seeded_network(dtype, seed=0):
    """A DeepConvNet with seeded weights, leaving the global NumPy RNG as it was."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return DeepConvNet(input_dim=INPUT_SHAPE, dtype=dtype)
    finally:
        np.random.set_state(state)


def network_shapes(batch=BATCH):
    """The shapes each kernel sees in ``DeepConvNet`` for a batch, read from a forward pass of its layers."""
    net = _seeded_network(np.float64)
    x = np.zeros((1,) + INPUT_SHAPE)  # one image: the layers' output sizes, scaled to the batch below
    conv, pool, relu, affine = [], [], [], []
    relu_shapes = set()
    with fastconv.use_backend("reference"):
        for layer in net.layers:
            in_shape = (batch,) + x.shape[1:]
            x = layer.forward(x, False) if isinstance(layer, Dropout) else layer.forward(x)
            out_hw = tuple(x.shape[2:])
            if isinstance(layer, Convolution):
                conv.append(ConvShape(f"conv{len(conv) + 1}", in_shape, np.shape(layer.W), layer.stride,
                                      layer.pad, out_hw))
            elif isinstance(layer, Pooling):
                pool.append(PoolShape(f"pool{len(pool) + 1}", in_shape, layer.pool_h, layer.pool_w,
                                      layer.stride, layer.pad, out_hw))
            elif isinstance(layer, Affine):
                affine.append(AffineShape(f"affine{len(affine) + 1}", in_shape, np.shape(layer.W)))
            elif isinstance(layer, Relu) and in_shape not in relu_shapes:
                relu_shapes.add(in_shape)
                relu.append(ReluShape(f"relu{len(conv) + len(affine)}", in_shape))  # relu k follows weight layer k
    return NetworkShapes(tuple(conv), tuple(pool), tuple(relu), tuple(affine))


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
