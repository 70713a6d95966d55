"""The kernel interface: the only way layers reach a backend.

Each function validates its inputs (shapes, dtypes, strides, pads), makes the
arrays C-contiguous in the compute dtype, and calls the same-named function of
the active backend module. A backend module implements exactly these
functions, with the same arguments, already validated:

    im2col(x, filter_h, filter_w, stride, pad) -> col
    col2im(col, x_shape, filter_h, filter_w, stride, pad) -> x
    conv_forward(x, W, b, stride, pad, workspace) -> (out, cache)
    conv_backward(dout, cache, W) -> (dx, dW, db)
    maxpool_forward(x, pool_h, pool_w, stride, pad, workspace) -> (out, cache)
    maxpool_backward(dout, cache) -> dx
    relu_forward(x) -> (out, mask)
    relu_backward(dout, mask) -> dx
    affine_forward(x, W, b) -> out
    affine_backward(dout, x, W) -> (dx, dW, db)

Conventions (the book's):
- ``col`` has shape (N*out_h*out_w, C*filter_h*filter_w): rows ordered by
  (n, y, x), columns by (c, ky, kx). ``col2im`` is the adjoint of ``im2col``
  (overlapping windows are summed).
- The compute dtype is the dtype of ``x`` (float32 or float64); for a
  convolution it is NumPy's promotion of ``x`` and ``W`` (float32 images with
  float64 weights compute in float64, as the book does). Outputs have that dtype.
- ``cache`` is whatever the backend needs for backward, with at least the
  attributes ``x_shape``, ``dtype`` and ``out_hw`` (the forward input's shape
  and dtype, the output's (out_h, out_w)); the previous cache of
  the same layer is passed back as ``workspace`` so buffers may be reused
  (a backend must check that shapes still match). Attributes ``col``,
  ``col_W`` (convolution) and ``arg_max`` (pooling) are exposed by the layers
  when the cache has them.
- Max pooling pads with -inf (padded cells never win) and sends each gradient
  to the first maximum of its window in (ky, kx) order.
- ``mask`` is the boolean array ``x <= 0``; ``relu_backward`` zeroes ``dout``
  where ``mask`` is set, in place, and returns it.
"""
import numpy as np

from fastconv import _checks
from fastconv._registry import backend_module


def im2col(x, filter_h, filter_w, stride=1, pad=0):
    """Unfold NCHW images into a matrix of windows, shape (N*out_h*out_w, C*filter_h*filter_w)."""
    x = _checks.float_array("x", x, ndim=4)
    fh, fw, stride, pad, _, _ = _checks.window_geometry(x.shape, filter_h, filter_w, stride, pad)
    return backend_module().im2col(x, fh, fw, stride, pad)


def col2im(col, input_shape, filter_h, filter_w, stride=1, pad=0):
    """Fold a window matrix back into NCHW images, summing where windows overlap."""
    input_shape = _checks.shape4("input_shape", input_shape)
    col = _checks.float_array("col", col, ndim=2)
    fh, fw, stride, pad, out_h, out_w = _checks.window_geometry(input_shape, filter_h, filter_w, stride, pad)
    n, c = input_shape[:2]
    expected = (n * out_h * out_w, c * fh * fw)
    if col.shape != expected:
        raise ValueError(f"col must have shape {expected} for input_shape {input_shape}, got {col.shape}")
    return backend_module().col2im(col, input_shape, fh, fw, stride, pad)


def conv_forward(x, W, b, stride=1, pad=0, workspace=None):
    """Convolution (cross-correlation) of NCHW ``x`` with filters ``W`` (FN, C, FH, FW) plus bias ``b``."""
    # NumPy promotion, as the book's np.dot(col, col_W) does
    x, W = _promoted(_checks.float_array("x", x, ndim=4), _checks.float_array("W", W, ndim=4))
    b = _checks.float_array("b", b, dtype=x.dtype)
    if W.shape[1] != x.shape[1]:
        raise ValueError(f"W has {W.shape[1]} input channels but x has {x.shape[1]} (x.shape={x.shape}, W.shape={W.shape})")
    if b.size != W.shape[0]:
        raise ValueError(f"b must have {W.shape[0]} elements (one per filter), got shape {b.shape}")
    b = b.reshape(W.shape[0])
    _, _, stride, pad, _, _ = _checks.window_geometry(x.shape, W.shape[2], W.shape[3], stride, pad)
    return backend_module().conv_forward(x, W, b, stride, pad, workspace)


def conv_backward(dout, cache, W):
    """Gradients (dx, dW, db) of a convolution, from the cache ``conv_forward`` returned."""
    if cache is None:
        raise ValueError("cache is None: call forward before backward")
    W = _checks.float_array("W", W, ndim=4, dtype=cache.dtype)
    dout = _checks.float_array("dout", dout, ndim=4, dtype=cache.dtype)
    expected = (cache.x_shape[0], W.shape[0]) + tuple(cache.out_hw)
    if dout.shape != expected:
        raise ValueError(f"dout must have shape {expected} (the forward output's), got {dout.shape}")
    return backend_module().conv_backward(dout, cache, W)


def maxpool_forward(x, pool_h, pool_w, stride=2, pad=0, workspace=None):
    """Max pooling over (pool_h, pool_w) windows; padded cells are -inf."""
    x = _checks.float_array("x", x, ndim=4)
    ph, pw, stride, pad, _, _ = _checks.window_geometry(x.shape, pool_h, pool_w, stride, pad)
    if 2 * pad > min(ph, pw):
        # otherwise a window could hold padding only and have no maximum
        raise ValueError(f"pad must be at most half the pool size, got pad={pad} for a {ph}x{pw} pool")
    return backend_module().maxpool_forward(x, ph, pw, stride, pad, workspace)


def maxpool_backward(dout, cache):
    """Gradient of max pooling: each output gradient goes to the first maximum of its window."""
    if cache is None:
        raise ValueError("cache is None: call forward before backward")
    dout = _checks.float_array("dout", dout, ndim=4, dtype=cache.dtype)
    expected = tuple(cache.x_shape[:2]) + tuple(cache.out_hw)
    if dout.shape != expected:
        raise ValueError(f"dout must have shape {expected} (the forward output's), got {dout.shape}")
    return backend_module().maxpool_backward(dout, cache)


def relu_forward(x):
    """(max(x, 0), mask) where mask is ``x <= 0``."""
    x = _checks.float_array("x", x)
    return backend_module().relu_forward(x)


def relu_backward(dout, mask):
    """``dout`` with zeros where ``mask`` is set (written in place when dout is C-contiguous)."""
    dout = _checks.float_array("dout", dout)
    mask = _checks.bool_array("mask", mask, shape=dout.shape)
    return backend_module().relu_backward(dout, mask)


def _promoted(x, W):
    """``x`` and ``W`` in their common dtype, as NumPy promotes them in ``np.dot``."""
    if W.dtype != x.dtype:
        dtype = np.promote_types(x.dtype, W.dtype)
        x, W = x.astype(dtype), W.astype(dtype)
    return x, W


def affine_forward(x, W, b):
    """``x @ W + b`` for ``x`` of shape (N, D), ``W`` (D, M), ``b`` (M,)."""
    x, W = _promoted(_checks.float_array("x", x, ndim=2), _checks.float_array("W", W, ndim=2))
    if x.shape[1] != W.shape[0]:
        raise ValueError(f"x has {x.shape[1]} features but W expects {W.shape[0]} (x.shape={x.shape}, W.shape={W.shape})")
    b = _checks.float_array("b", b, dtype=x.dtype)
    if b.size != W.shape[1]:
        raise ValueError(f"b must have {W.shape[1]} elements (one per output), got shape {b.shape}")
    return backend_module().affine_forward(x, W, b.reshape(W.shape[1]))


def affine_backward(dout, x, W):
    """Gradients (dx, dW, db) of ``x @ W + b``."""
    x, W = _promoted(_checks.float_array("x", x, ndim=2), _checks.float_array("W", W, ndim=2))
    dout = _checks.float_array("dout", dout, ndim=2, dtype=x.dtype)
    expected = (x.shape[0], W.shape[1])
    if dout.shape != expected or x.shape[1] != W.shape[0]:
        raise ValueError(f"dout must have shape {expected} for x {x.shape} and W {W.shape}, got {dout.shape}")
    return backend_module().affine_backward(dout, x, W)
