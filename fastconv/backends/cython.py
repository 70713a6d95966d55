"""The compiled backend: Cython kernels with OpenMP, GEMMs through SciPy's BLAS.

Every kernel works directly in NCHW; convolutions unfold a block of images
at a time into a cache-sized buffer and multiply it with the filters there
(see ``fastconv/_ext/_conv.pyx``), so neither the book's batch-sized ``col``
nor any transpose of the output is ever made.

Threading: one thread pool is busy at a time. The kernels split their work
over images (or image planes) in an OpenMP region of ``get_num_threads()``
threads, and the GEMMs run inside that region, one per block of images, on a
BLAS held to a single thread for the duration of the call (its previous
setting is restored afterwards). An OpenMP pool and a multi-threaded BLAS
pool taking turns would otherwise spin-wait against each other.

Buffers: outputs (``out``, ``dx``, ``dW``, ``db``, ``mask``) are always new
arrays, since the caller may keep them. Scratch buffers and the pooling
indices live in the cache and are taken over by the next forward call of the
same layer (its previous cache comes back as ``workspace``) when their dtype
matches and they are large enough; anything else is allocated anew, so batch
size and dtype may change between calls.

Results do not depend on the number of threads, bit for bit: convolution
backward sums dW and db over a fixed number of image groups (``DW_GROUPS``),
in order, whatever the number of threads.
"""
import os

import numpy as np

from fastconv._threads import get_num_threads
from fastconv.backends._blas import affine_backward, affine_forward  # noqa: F401  (part of the interface)
from fastconv.backends._blas import single_threaded_blas as _single_threaded_blas

# Idle OpenMP threads sleep rather than spin (unless the user chose a policy).
# Spinning threads hold a core for milliseconds after every kernel, which the
# BLAS pool of the NumPy layers in between, or any other process, then waits
# for. The runtime reads it once, when it loads with the first extension;
# child processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from fastconv._ext import _conv
except ModuleNotFoundError as exc:
    if exc.name and exc.name.split(".")[0] == "scipy":
        raise ImportError("the cython backend needs SciPy for its BLAS: pip install scipy") from exc
    raise
from fastconv._ext import _buildinfo, _im2col, _parallel, _pool, _relu  # noqa: E402

NAME = "cython"

# Convolution backward sums dW over this many groups of images (fewer for
# smaller batches): it is also the most threads that pass can use.
DW_GROUPS = 16

# Convolutions multiply the windows of several small images at once, about
# this many output pixels per GEMM: small GEMMs waste time packing operands.
GEMM_COLUMNS = 256

# An image with more output pixels than that is unfolded a few output lines at
# a time, about this many bytes of unfolded windows per piece, so that they
# are still in cache when the GEMM reads them (0: whole images).
TILE_BYTES = 1 << 17

# Least work that earns a thread of its own, about 100 us: waking a sleeping
# thread costs tens of microseconds on an idle machine, and milliseconds on a
# busy one, where it has to wait for a core. Convolutions always have enough.
# ReLU is bound by memory traffic: a second thread pays from a few MB on
# (measured on the network's activations, float32 and float64).
MIN_RELU_FORWARD_BYTES_PER_THREAD = 3 << 19
MIN_RELU_BACKWARD_BYTES_PER_THREAD = 5 << 19
MIN_POOL_CELLS_PER_THREAD = 1 << 17


class ConvCache:
    """What convolution backward needs, and the scratch the next forward may reuse."""

    __slots__ = ("x", "stride", "pad", "x_shape", "dtype", "out_hw", "scratch", "dw_groups")

    def __init__(self, x, stride, pad, out_hw, scratch, dw_groups):
        self.x = x  # backward unfolds the input again (the layer keeps it as well)
        self.stride = stride
        self.pad = pad
        self.x_shape = x.shape
        self.dtype = x.dtype
        self.out_hw = out_hw
        self.scratch = scratch
        self.dw_groups = dw_groups


class PoolCache:
    """Where each pooling output took its maximum from (see ``_pool.pyx``)."""

    __slots__ = ("source", "pool_h", "pool_w", "stride", "pad", "x_shape", "dtype", "out_hw")

    def __init__(self, source, pool_h, pool_w, stride, pad, x_shape, dtype, out_hw):
        self.source = source
        self.pool_h = pool_h
        self.pool_w = pool_w
        self.stride = stride
        self.pad = pad
        self.x_shape = x_shape
        self.dtype = dtype
        self.out_hw = out_hw


_OPENMP = _buildinfo.openmp_enabled()


def _threads(work, least_per_thread=1):
    """Threads for ``work`` units, each thread getting at least ``least_per_thread`` of them."""
    if work < 2 * least_per_thread or not _OPENMP:
        return 1
    return min(get_num_threads(), work // least_per_thread)


def parallel_threads():
    """Threads the kernels run on now: ``get_num_threads()``, or 1 in a build without OpenMP."""
    return _parallel.team_size(get_num_threads())


def _out_size(size, window, stride, pad):
    return (size + 2 * pad - window) // stride + 1


def _buffer(owner, name, size, dtype):
    """``owner.name`` if it is a flat ``dtype`` array of at least ``size`` elements, else a new one of ``size``."""
    previous = getattr(owner, name, None)
    if isinstance(previous, np.ndarray) and previous.ndim == 1 and previous.dtype == dtype and previous.size >= size:
        return previous
    return np.empty(size, dtype=dtype)


def im2col(x, filter_h, filter_w, stride, pad):
    N, C, H, W = x.shape
    out_h = _out_size(H, filter_h, stride, pad)
    out_w = _out_size(W, filter_w, stride, pad)
    col = np.empty((N * out_h * out_w, C * filter_h * filter_w), dtype=x.dtype)
    threads = _threads(N)
    scratch = np.empty(threads * col.shape[1] * out_h * out_w, dtype=x.dtype)
    _im2col.im2col(x, col, filter_h, filter_w, stride, pad, scratch, threads)
    return col


def col2im(col, x_shape, filter_h, filter_w, stride, pad):
    x = np.empty(x_shape, dtype=col.dtype)
    threads = _threads(x_shape[0])
    scratch = np.empty(threads * col.size // x_shape[0], dtype=col.dtype)
    _im2col.col2im(col, x, filter_h, filter_w, stride, pad, scratch, threads)
    return x


def _images_per_gemm(batch, out_hw):
    """Images whose windows go into one GEMM: enough for about GEMM_COLUMNS columns."""
    return max(1, min(batch, -(-GEMM_COLUMNS // out_hw)))


def _tile_lines(block, K, out_h, out_w, itemsize):
    """Output lines per piece of work: all of them for a block of several images."""
    if block > 1 or TILE_BYTES <= 0:
        return out_h
    return max(1, min(out_h, TILE_BYTES // (K * out_w * itemsize)))


def conv_forward(x, W, b, stride, pad, workspace):
    FN, C, FH, FW = W.shape
    N, _, H, Wd = x.shape
    out_h = _out_size(H, FH, stride, pad)
    out_w = _out_size(Wd, FW, stride, pad)
    block = _images_per_gemm(N, out_h * out_w)
    threads = _threads(-(-N // block))
    # sized for backward too, so that one allocation serves both
    per_thread = _conv.scratch_per_thread(C * FH * FW, FN, block, out_h * out_w)
    most_threads = max(threads, _threads(min(N, DW_GROUPS)))
    scratch = _buffer(workspace, "scratch", most_threads * per_thread, x.dtype)
    out = np.empty((N, FN, out_h, out_w), dtype=x.dtype)
    with _single_threaded_blas:
        _conv.conv_forward(x, W.reshape(FN, -1), b, out.reshape(N, FN, out_h * out_w), scratch,
                           FH, FW, stride, pad, block, _tile_lines(block, C * FH * FW, out_h, out_w, x.itemsize),
                           threads)
    dw_groups = getattr(workspace, "dw_groups", None)
    return out, ConvCache(x, stride, pad, (out_h, out_w), scratch, dw_groups)


def conv_backward(dout, cache, W):
    FN, C, FH, FW = W.shape
    x = cache.x
    N = x.shape[0]
    out_h, out_w = cache.out_hw
    block = _images_per_gemm(N, out_h * out_w)
    groups = min(N, DW_GROUPS)
    threads = _threads(groups)
    per_thread = _conv.scratch_per_thread(C * FH * FW, FN, block, out_h * out_w)
    cache.scratch = _buffer(cache, "scratch", threads * per_thread, x.dtype)
    cache.dw_groups = _buffer(cache, "dw_groups", groups * W.size, x.dtype)
    dw_groups = cache.dw_groups[:groups * W.size].reshape(groups, -1)
    db_groups = np.empty((groups, FN), dtype=np.float64)
    dx = np.empty(cache.x_shape, dtype=x.dtype)
    dW = np.empty(W.shape, dtype=x.dtype)
    db = np.empty(FN, dtype=x.dtype)
    with _single_threaded_blas:
        _conv.conv_backward(x, W.reshape(FN, -1), dout.reshape(N, FN, out_h * out_w),
                            dx, dW.reshape(FN, -1), db, dw_groups, db_groups,
                            cache.scratch, FH, FW, cache.stride, cache.pad, block,
                            _tile_lines(block, C * FH * FW, out_h, out_w, x.itemsize), threads)
    return dx, dW, db


def maxpool_forward(x, pool_h, pool_w, stride, pad, workspace):
    N, C, H, W = x.shape
    out_h = _out_size(H, pool_h, stride, pad)
    out_w = _out_size(W, pool_w, stride, pad)
    out = np.empty((N, C, out_h, out_w), dtype=x.dtype)
    source = _buffer(workspace, "source", N * C * out_h * out_w, np.dtype(np.intc))
    threads = _threads(x.size, MIN_POOL_CELLS_PER_THREAD)
    _pool.maxpool_forward(x, out, source[:out.size], pool_h, pool_w, stride, pad, threads)
    return out, PoolCache(source, pool_h, pool_w, stride, pad, x.shape, x.dtype, (out_h, out_w))


def maxpool_backward(dout, cache):
    dx = np.empty(cache.x_shape, dtype=cache.dtype)
    _pool.maxpool_backward(dout, cache.source[:dout.size], dx, _threads(dx.size, MIN_POOL_CELLS_PER_THREAD))
    return dx


def relu_forward(x):
    out = np.empty_like(x)
    mask = np.empty(x.shape, dtype=np.bool_)
    threads = _threads(x.nbytes, MIN_RELU_FORWARD_BYTES_PER_THREAD)
    _relu.relu_forward(x.reshape(-1), out.reshape(-1), mask.reshape(-1).view(np.uint8), threads)
    return out, mask


def relu_backward(dout, mask):
    threads = _threads(dout.nbytes, MIN_RELU_BACKWARD_BYTES_PER_THREAD)
    _relu.relu_backward(dout.reshape(-1), mask.reshape(-1).view(np.uint8), threads)
    return dout
