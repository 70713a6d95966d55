"""The kernel interface: the only way layers reach a backend.

Each function validates its inputs (shapes, dtypes, strides, pads), makes the
arrays C-contiguous in the compute dtype, and calls the same-named function of
the active backend module. A backend module implements exactly these
functions, with the same arguments, already validated:

    im2col(x, filter_h, filter_w, stride, pad) -> col
    col2im(col, x_shape, filter_h, filter_w, stride, pad) -> x
    conv_forward(x, W, b, stride, pad, workspace, relu, for_backward) -> (out, cache)
    conv_backward(dout, cache, W, relu_out, input_gradient) -> (dx, dW, db)
    conv_relu_pool_forward(x, W, b, stride, pad, pool_h, pool_w, pool_stride, pool_pad,
                           workspace) -> (pooled, cache)
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
- A backend's forward returns ``(out, state)``: whatever its backward needs.
  This interface returns it wrapped in a ``ForwardCache`` that records what
  backward checks about the forward (backend, input shape, dtype, filter
  shape, stride, pad, output size) and reads the backend's attributes
  through (``col``, ``col_W``, ``arg_max``, which the layers expose when the
  backend has them). A backward call with a cache from another backend, or a
  ``W`` of another shape than the forward's, is a ``ValueError`` before any
  backend code runs.
- The previous cache of the same layer comes back as ``workspace``, so that
  a backend may reuse its buffers (checking that shapes still match); a
  backend receives only its own states there. Handing a cache to a forward
  as ``workspace`` gives its buffers away: backward with it is then a
  ``ValueError``.
- Empty batches (N = 0), inputs without channels (C = 0) and convolutions
  without filters (FN = 0) give correctly shaped results (empty, or zeros
  and sums over nothing) without calling the backend. Heights and widths
  must be at least 1.
- Max pooling pads with -inf (padded cells never win) and sends each gradient
  to the first maximum of its window in (ky, kx) order.
- The fast backends give the same results bit for bit whatever
  ``FASTCONV_NUM_THREADS`` and whichever Python thread makes the call: they
  hold the BLAS to one thread for their products, from any calling thread.
  The reference's products run on NumPy's BLAS as it is set, whose thread
  count can change the last bits. Backends agree within rounding.
- ``mask`` is the boolean array ``x <= 0`` (``_checks.relu_mask``); ``relu_backward`` zeroes ``dout``
  where ``mask`` is set, in place, and returns it.
- ``conv_forward(..., relu=True)`` is a convolution followed by a ReLU in one
  pass: ``out`` is the ReLU's output, and ``conv_backward`` then takes the
  gradient of that output and zeroes it where ``out <= 0`` before using it
  (the backend receives ``out`` as ``relu_out``; otherwise ``relu_out`` is
  None). The cache keeps a reference to ``out``: it must not be changed
  before backward.
- ``conv_backward(..., input_gradient=False)`` returns None for dx: a network's
  first layer, whose dx nobody reads. A backend may then skip computing it.
- ``conv_forward(..., for_backward=False)`` says that no backward will
  follow (inference): a backend may then keep nothing for it, and
  ``conv_backward`` with that cache is a ``ValueError``.
- ``conv_relu_pool_forward`` is inference through a convolution, its ReLU
  and a max pooling: the pooling's output, as ``maxpool_forward`` of
  ``conv_forward(..., relu=True, for_backward=False)``'s output gives it, and
  that forward's cache. A backend may skip writing the convolution's output.
"""
import numpy as np

from fastconv import _checks
from fastconv._registry import backend_module, get_backend

# The functions every backend module implements (listed with their arguments above); a module that lacks
# one is not registered as a backend (``fastconv._registry``).
INTERFACE = ("im2col", "col2im", "conv_forward", "conv_backward", "conv_relu_pool_forward", "maxpool_forward",
             "maxpool_backward", "relu_forward", "relu_backward", "affine_forward", "affine_backward")


class ForwardCache:
    """A backend's forward state, with what backward checks about that forward.

    Reading an attribute it does not have reads the backend's state (``col``,
    ``arg_max``, a backend's own buffers). ``lease`` is shared by every cache
    whose buffers came from the same first forward: a forward that takes one
    as ``workspace`` bumps its count, which retires the caches before it.
    """

    __slots__ = ("state", "backend", "kind", "x_shape", "dtype", "out_hw", "W_shape", "window", "stride", "pad",
                 "lease", "generation", "relu_out", "for_backward")

    def __init__(self, state, kind, x_shape, dtype, out_hw, window, stride, pad, workspace, W_shape=None,
                 relu_out=None, for_backward=True):
        self.state = state
        self.backend = get_backend()
        self.kind = kind
        self.x_shape = tuple(x_shape)
        self.dtype = np.dtype(dtype)
        self.out_hw = tuple(out_hw)
        self.W_shape = W_shape
        self.window = window
        self.stride = stride
        self.pad = pad
        self.lease = workspace.lease if workspace is not None else [0]
        self.generation = self.lease[0]
        self.relu_out = relu_out  # a fused ReLU's output, whose mask backward applies to dout
        self.for_backward = bool(for_backward)  # False: an inference forward, which backward refuses

    def __getattr__(self, name):
        try:
            state = object.__getattribute__(self, "state")
        except AttributeError:  # not initialized yet (copy, pickle)
            raise AttributeError(name) from None
        return getattr(state, name)


def _reusable(workspace, kind):
    """The backend state inside ``workspace`` if this backend may reuse it, else None; retires it."""
    if not isinstance(workspace, ForwardCache) or workspace.kind != kind or workspace.backend != get_backend():
        return None  # nothing, or another backend's buffers: allocate anew
    workspace.lease[0] += 1  # its buffers now belong to the forward under way
    return workspace


def _checked_cache(cache, kind):
    """``cache`` after checking that it holds the state of a valid forward of ``kind`` on this backend."""
    if cache is None:
        raise ValueError("cache is None: call forward first")
    if not isinstance(cache, ForwardCache) or cache.kind != kind:
        raise TypeError(f"cache must be the cache {kind}_forward returned, got {type(cache).__name__}"
                        + (f" of {cache.kind}_forward" if isinstance(cache, ForwardCache) else ""))
    if cache.backend != get_backend():
        raise ValueError(f"cache was made by the {cache.backend!r} backend but the active backend is "
                         f"{get_backend()!r}: call forward again on this backend")
    if cache.generation != cache.lease[0]:
        raise ValueError("cache was passed as workspace to a later forward, which took over its buffers: "
                         "call backward with the cache of the latest forward")
    return cache


def im2col(x, filter_h, filter_w, stride=1, pad=0):
    """Unfold NCHW images into a matrix of windows, shape (N*out_h*out_w, C*filter_h*filter_w)."""
    x = _images("x", x)
    fh, fw, stride, pad, out_h, out_w = _checks.window_geometry(x.shape, filter_h, filter_w, stride, pad)
    if x.size == 0:
        return np.zeros((x.shape[0] * out_h * out_w, x.shape[1] * fh * fw), dtype=x.dtype)
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
    if col.size == 0:
        return np.zeros(input_shape, dtype=col.dtype)
    return backend_module().col2im(col, input_shape, fh, fw, stride, pad)


def _images(name, x):
    """``x`` as checked C-contiguous float NCHW images."""
    x = _checks.float_array(name, x, ndim=4)
    _checks.image_shape(f"{name}.shape", x.shape)
    return x


def conv_forward(x, W, b, stride=1, pad=0, workspace=None, relu=False, for_backward=True):
    """Convolution (cross-correlation) of NCHW ``x`` with filters ``W`` (FN, C, FH, FW) plus bias ``b``.

    With ``relu``, the output goes through a ReLU in the same pass, and ``conv_backward``
    takes the gradient of the ReLU's output. With ``for_backward=False`` (inference) the
    backend may keep nothing for backward, which the cache then refuses.
    """
    for name, flag in (("relu", relu), ("for_backward", for_backward)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    x, W, b, fh, fw, stride, pad, out_h, out_w = _conv_arguments(x, W, b, stride, pad)
    workspace = _reusable(workspace, "conv")
    if x.size == 0 or W.size == 0:  # no products: the bias alone (or nothing)
        out, state = np.zeros((x.shape[0], W.shape[0], out_h, out_w), dtype=x.dtype) + b[:, None, None], None
        if relu:
            out[_checks.relu_mask(out)] = 0
    else:
        out, state = backend_module().conv_forward(x, W, b, stride, pad, getattr(workspace, "state", None),
                                                   bool(relu), bool(for_backward))
    return out, _conv_cache(state, x, W, (fh, fw), stride, pad, (out_h, out_w), workspace,
                            out if relu else None, for_backward)


def conv_relu_pool_forward(x, W, b, stride=1, pad=0, pool_h=2, pool_w=2, pool_stride=2, pool_pad=0,
                           workspace=None):
    """Inference through a convolution, its ReLU and a max pooling, in one pass where the backend can:
    ``(pooled, cache)``, ``pooled`` as ``maxpool_forward`` of ``conv_forward(..., relu=True,
    for_backward=False)``'s output gives it, ``cache`` that forward's (it refuses backward)."""
    x, W, b, fh, fw, stride, pad, out_h, out_w = _conv_arguments(x, W, b, stride, pad)
    pool = _pool_geometry((x.shape[0], W.shape[0], out_h, out_w), pool_h, pool_w, pool_stride, pool_pad)
    if x.size == 0 or W.size == 0:
        out, cache = conv_forward(x, W, b, stride, pad, workspace, relu=True, for_backward=False)
        return maxpool_forward(out, *pool[:4])[0], cache
    workspace = _reusable(workspace, "conv")
    pooled, state = backend_module().conv_relu_pool_forward(x, W, b, stride, pad, *pool[:4],
                                                            getattr(workspace, "state", None))
    return pooled, _conv_cache(state, x, W, (fh, fw), stride, pad, (out_h, out_w), workspace, None, False)


def _conv_cache(state, x, W, window, stride, pad, out_hw, workspace, relu_out, for_backward):
    return ForwardCache(state, "conv", x.shape, x.dtype, out_hw, window, stride, pad, workspace,
                        W_shape=W.shape, relu_out=relu_out, for_backward=for_backward)


def _conv_arguments(x, W, b, stride, pad):
    """Checked (x, W, b, filter_h, filter_w, stride, pad, out_h, out_w) of a convolution."""
    # NumPy promotion, as the book's np.dot(col, col_W) does
    x, W = _promoted(_images("x", x), _checks.float_array("W", W, ndim=4))
    b = _checks.float_array("b", b, dtype=x.dtype)
    if W.shape[1] != x.shape[1]:
        raise ValueError(f"W has {W.shape[1]} input channels but x has {x.shape[1]} (x.shape={x.shape}, W.shape={W.shape})")
    if b.size != W.shape[0]:
        raise ValueError(f"b must have {W.shape[0]} elements (one per filter), got shape {b.shape}")
    b = b.reshape(W.shape[0])
    fh, fw, stride, pad, out_h, out_w = _checks.window_geometry(x.shape, W.shape[2], W.shape[3], stride, pad)
    return x, W, b, fh, fw, stride, pad, out_h, out_w


def conv_backward(dout, cache, W, input_gradient=True):
    """Gradients (dx, dW, db) of a convolution, from the cache ``conv_forward`` returned; dx is None
    with ``input_gradient=False``."""
    cache = _checked_cache(cache, "conv")
    if not cache.for_backward:
        raise ValueError("cache is of a forward run with for_backward=False (inference), which keeps nothing "
                         "for backward: run forward again for training")
    W = _checks.float_array("W", W, ndim=4)
    if W.shape != cache.W_shape:
        raise ValueError(f"W must have the shape it had in forward, {cache.W_shape}, got {W.shape}: "
                         "call forward again after replacing W")
    if np.promote_types(W.dtype, cache.dtype) != cache.dtype:
        raise ValueError(f"W has dtype {W.dtype} but the forward computed in {cache.dtype}: "
                         "call forward again after replacing W")
    W = W.astype(cache.dtype, copy=False)
    dout = _checks.float_array("dout", dout, ndim=4, dtype=cache.dtype)
    expected = (cache.x_shape[0], W.shape[0]) + cache.out_hw
    if dout.shape != expected:
        raise ValueError(f"dout must have shape {expected} (the forward output's), got {dout.shape}")
    if cache.state is None:  # an empty forward: no products either
        if cache.relu_out is not None:
            dout = np.where(_checks.relu_mask(cache.relu_out), 0, dout).astype(cache.dtype, copy=False)
        dx = np.zeros(cache.x_shape, dtype=cache.dtype) if input_gradient else None
        return dx, np.zeros(W.shape, dtype=cache.dtype), dout.sum(axis=(0, 2, 3))
    dx, dW, db = backend_module().conv_backward(dout, cache.state, W, cache.relu_out, bool(input_gradient))
    return (dx if input_gradient else None), dW, db


def maxpool_forward(x, pool_h, pool_w, stride=2, pad=0, workspace=None):
    """Max pooling over (pool_h, pool_w) windows; padded cells are -inf."""
    shape = np.shape(x)
    if len(shape) == 4:  # before any copy: a huge broadcast view must not be materialized
        _checks.pool_plane(shape)
    x = _images("x", x)
    ph, pw, stride, pad, out_h, out_w = _pool_geometry(x.shape, pool_h, pool_w, stride, pad)
    workspace = _reusable(workspace, "maxpool")
    if x.size == 0:
        out, state = np.zeros(x.shape[:2] + (out_h, out_w), dtype=x.dtype), None
    else:
        out, state = backend_module().maxpool_forward(x, ph, pw, stride, pad, getattr(workspace, "state", None))
    return out, ForwardCache(state, "maxpool", x.shape, x.dtype, (out_h, out_w), (ph, pw), stride, pad, workspace)


def _pool_geometry(shape, pool_h, pool_w, stride, pad):
    """Checked (pool_h, pool_w, stride, pad, out_h, out_w) of pooling images of ``shape``."""
    _checks.pool_plane(shape)
    ph, pw, stride, pad, out_h, out_w = _checks.window_geometry(shape, pool_h, pool_w, stride, pad)
    if 2 * pad > min(ph, pw):
        # otherwise a window could hold padding only and have no maximum
        raise ValueError(f"pad must be at most half the pool size, got pad={pad} for a {ph}x{pw} pool")
    return ph, pw, stride, pad, out_h, out_w


def maxpool_backward(dout, cache):
    """Gradient of max pooling: each output gradient goes to the first maximum of its window."""
    cache = _checked_cache(cache, "maxpool")
    dout = _checks.float_array("dout", dout, ndim=4, dtype=cache.dtype)
    expected = cache.x_shape[:2] + cache.out_hw
    if dout.shape != expected:
        raise ValueError(f"dout must have shape {expected} (the forward output's), got {dout.shape}")
    if cache.state is None:
        return np.zeros(cache.x_shape, dtype=cache.dtype)
    return backend_module().maxpool_backward(dout, cache.state)


def relu_forward(x):
    """(max(x, 0), mask) where mask is ``x <= 0``."""
    x = _checks.float_array("x", x)
    return backend_module().relu_forward(x)


def relu_backward(dout, mask):
    """``dout`` with zeros where ``mask`` is set (written in place when dout is C-contiguous)."""
    if mask is None:
        raise ValueError("mask is None: call forward first")
    dout = _checks.float_array("dout", dout)
    if not dout.flags.writeable:
        raise ValueError("dout is read-only, but relu_backward zeroes it in place: pass a writable array "
                         "(e.g. dout.copy())")
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
