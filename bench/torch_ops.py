"""PyTorch (CPU, eager) equivalents of the timed operations: an external yardstick.

Each factory mirrors the fastconv one of the same name in
``bench.benchmarks._network``: same shapes, same data, same work (the book's
column layout for im2col, indices kept by max pooling for its backward, the
relu mask built with the output). The network gets the seeded fastconv
network's parameters, handed over as arrays. This module never imports
fastconv: the report runs it in a process of its own, so that PyTorch runs as
it does in a user's program. PyTorch is optional; ``load_torch`` returns None
when it does not import.
"""
import numpy as np

from bench.benchmarks import _shapes as net

torch = None
F = None


def load_torch(num_threads=None):
    """Import torch once; returns the module or None. Sets its intra-op threads when given."""
    global torch, F
    if torch is None:
        try:
            import torch as _torch
            import torch.nn.functional as _F
        except Exception:  # any failure to import means "no yardstick", never an error
            return None
        torch, F = _torch, _F
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    return torch


def _t(array):
    return torch.from_numpy(np.ascontiguousarray(array))


def im2col_op(shape, dtype):
    x = _t(net.conv_arrays(shape, dtype)[0])
    _, _, fh, fw = shape.w_shape
    rows, cols = shape.col_shape

    # unfold gives (N, C*fh*fw, L) with columns in (c, ky, kx) order; the book wants (N*L, C*fh*fw)
    return lambda: F.unfold(x, (fh, fw), padding=shape.pad, stride=shape.stride).transpose(1, 2).reshape(rows, cols)


def col2im_op(shape, dtype):
    n = shape.x_shape[0]
    rows, cols = shape.col_shape
    col = _t(net.col_array(shape, dtype))
    _, _, fh, fw = shape.w_shape
    size = shape.x_shape[2:]
    return lambda: F.fold(col.reshape(n, rows // n, cols).transpose(1, 2), size, (fh, fw),
                          padding=shape.pad, stride=shape.stride)


def conv_forward_op(shape, dtype):
    x, W, b, _ = (_t(a) for a in net.conv_arrays(shape, dtype))
    return lambda: F.conv2d(x, W, b, stride=shape.stride, padding=shape.pad)


def conv_backward_op(shape, dtype):
    x, W, _, dout = (_t(a) for a in net.conv_arrays(shape, dtype))
    s, p = [shape.stride] * 2, [shape.pad] * 2
    return lambda: torch.ops.aten.convolution_backward(
        dout, x, W, [W.shape[0]], s, p, [1, 1], False, [0, 0], 1, [True, True, True])


def _pool_args(shape):
    return [shape.pool_h, shape.pool_w], [shape.stride] * 2, [shape.pad] * 2


def maxpool_forward_op(shape, dtype):
    x = _t(net.pool_arrays(shape, dtype)[0])
    kernel, stride, pad = _pool_args(shape)
    return lambda: F.max_pool2d(x, kernel, stride, pad, return_indices=True)


def maxpool_backward_op(shape, dtype):
    x, dout = (_t(a) for a in net.pool_arrays(shape, dtype))
    kernel, stride, pad = _pool_args(shape)
    _, indices = F.max_pool2d(x, kernel, stride, pad, return_indices=True)
    return lambda: torch.ops.aten.max_pool2d_with_indices_backward(
        dout, x, kernel, stride, pad, [1, 1], False, indices)


def relu_forward_op(shape, dtype):
    x = _t(net.relu_arrays(shape, dtype)[0])
    return lambda: (torch.relu(x), x <= 0)


def relu_backward_op(shape, dtype):
    x, dout = (_t(a) for a in net.relu_arrays(shape, dtype))
    mask = x <= 0
    return lambda: dout.masked_fill_(mask, 0)


def affine_forward_op(shape, dtype):
    x, W, b, _ = (_t(a) for a in net.affine_arrays(shape, dtype))
    x2 = x.reshape(x.shape[0], -1)
    return lambda: torch.addmm(b, x2, W)


def affine_backward_op(shape, dtype):
    x, W, _, dout = (_t(a) for a in net.affine_arrays(shape, dtype))
    x2 = x.reshape(x.shape[0], -1)

    def run():
        dx = (dout @ W.T).reshape(x.shape)
        return dx, x2.T @ dout, dout.sum(0)

    return run


def deep_conv_net(shapes, params):
    """The chapter-8 network as a torch module: ``shapes`` (``NetworkShapes``) and the book's
    parameters ``params`` (``W1``, ``b1``, ...: NumPy arrays, in the dtype wanted)."""
    layers = []
    for i, conv in enumerate(shapes.conv):
        fn, c, fh, fw = conv.w_shape
        module = torch.nn.Conv2d(c, fn, (fh, fw), stride=conv.stride, padding=conv.pad)
        module.weight.data = _t(params[f"W{i + 1}"]).clone()
        module.bias.data = _t(params[f"b{i + 1}"]).clone()
        layers += [module, torch.nn.ReLU()]
        if i % 2 == 1:
            pool = shapes.pool[i // 2]
            layers.append(torch.nn.MaxPool2d((pool.pool_h, pool.pool_w), pool.stride, pool.pad))
    layers.append(torch.nn.Flatten())
    for j, affine in enumerate(shapes.affine):
        k = len(shapes.conv) + j + 1
        module = torch.nn.Linear(*affine.w_shape)
        module.weight.data = _t(params[f"W{k}"].T).clone()
        module.bias.data = _t(params[f"b{k}"]).clone()
        layers.append(module)
        if j == 0:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Dropout(0.5))
    return torch.nn.Sequential(*layers)


def train_step_op(shapes, params, dtype, batch=net.BATCH):
    model = deep_conv_net(shapes, params).train()
    # eps as in the book's Adam; torch adds it after the bias correction, a negligible difference
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, betas=(0.9, 0.999), eps=1e-7)
    x, t = net.image_batch(batch, dtype)
    x, t = _t(x), _t(t)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        optimizer.step()

    return run


def inference_ops(shapes, params, dtype, n_images=net.INFERENCE_IMAGES, batch=net.BATCH):
    model = deep_conv_net(shapes, params).eval()
    x = _t(net.image_batch(n_images, dtype)[0])

    def run():
        with torch.no_grad():
            for start in range(0, n_images, batch):
                model(x[start:start + batch])

    def first_batch():
        with torch.no_grad():
            model(x[:batch])

    return run, first_batch


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
