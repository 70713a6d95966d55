"""The numba backend: jitted loops for convolution, pooling and ReLU; the convolutions call SciPy's BLAS.

Threading: the jitted kernels are serial and release the GIL; this module
cuts the batch into contiguous ranges of images (ReLU: of elements) and runs
one kernel call per range on a small pool of Python threads
(``get_num_threads()`` in all, the calling thread included), each thread
taking the next range left. A range writes only its own images, so no two
threads ever add into the same memory. Convolutions run their matrix
products inside those threads with the BLAS held to one thread (restored
afterwards): two thread pools taking turns, a multi-threaded BLAS and a
parallel kernel runtime, spin-wait against each other and lose several times
their speed.

Convolution never builds the book's batch-sized ``col``: each thread unfolds
a few images at a time into a buffer sized for the CPU cache and multiplies
it there, a whole chunk of images in one jitted call (``_numba_conv``), and
the backward pass unfolds the input again rather than reading a stored
copy. The book's ``col`` and ``col_W`` stay available as cache attributes
computed on first access.

Buffers: outputs (``out``, ``dx``, ``dW``, ``db``, ``mask``, ``col``,
``arg_max``) are always new arrays, since the caller may keep them. Scratch
buffers and the pooling indices live in the cache and are taken over by the
next forward call of the same layer (its previous cache comes back as
``workspace``) when their shapes and dtype still fit; otherwise they are
allocated anew.

Results do not depend on the number of threads: the images are cut into
chunks by a rule that ignores the thread count, and the convolution
gradients are summed over a fixed sequence of chunk groups, in order.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

try:
    import numba  # noqa: F401  (the kernels module needs it; fail here with a clear reason)
except Exception as exc:  # a broken install can raise more than ImportError
    raise ImportError(f"the numba backend needs a working numba (pip install numba): {exc}") from exc

from fastconv._threads import get_num_threads
from fastconv.backends import _numba_conv as _conv
from fastconv.backends import _numba_kernels as _k
from fastconv.backends._blas import affine_backward, affine_forward  # noqa: F401  (part of the interface)
from fastconv.backends._blas import single_threaded_blas as _single_threaded_blas

NAME = "numba"

# Bytes of unfolded windows one thread handles at a time (rounded to whole
# images): small enough to stay in a core's cache between being written and
# multiplied, large enough for the products to run near full speed (1 MiB was
# the best of 256 KiB to 2 MiB for the chapter-8 network on a 2-core EPYC).
CHUNK_BYTES = 1 << 20

# An image whose windows make a product of at least TILE_MIN_COLUMNS columns
# and take more than TILE_BYTES can be unfolded and multiplied a few output
# lines at a time (0: whole images). Off: unlike the cython backend's, these
# pieces made the chapter-8 network's second layer slower (float64, 2
# threads: forward 10.2 ms in 128 KB pieces against 8.6 ms whole).
TILE_BYTES = 0
TILE_MIN_COLUMNS = 256

# Products wider than this many columns (windows) are computed in pieces:
# OpenBLAS multiplies the second layer's (16, 144) filters into 392 columns
# at once faster than into 784 (float64, 2 threads: forward 6.0 ms against
# 7.0 ms; float32: 3.4 ms against 5.2 ms).
GEMM_COLUMNS = 512

# Convolution backward sums dW and db over at most this many chunk groups.
SUM_GROUPS = 16

# Below this many elements per thread a kernel runs on the calling thread only.
MIN_ELEMENTS_PER_THREAD = 1 << 15

# Pooling and ReLU cut their work into this many ranges per thread.
RANGES_PER_THREAD = 4


# --------------------------------------------------------------------------- threads

class _Workers:
    """A thread pool, grown on demand, that runs one call's tasks side by side."""

    def __init__(self):
        self._forget()
        if hasattr(os, "register_at_fork"):
            # a forked child has none of the parent's threads: start a new pool there
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self):
        self._lock = threading.Lock()
        self._executor = None
        self._size = 0

    def _pool(self, size):
        with self._lock:
            if self._size < size:
                if self._executor is not None:
                    self._executor.shutdown(wait=False)  # its threads exit once idle
                self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="fastconv-numba")
                self._size = size
            return self._executor

    def run(self, tasks):
        """Run tasks that drain one shared queue of work: the first on this thread, the others on the pool.

        When the first returns, the queue is empty: tasks that have not
        started yet (their thread was busy or not scheduled) are cancelled
        rather than waited for. Re-raises the first error.
        """
        if len(tasks) == 1:
            tasks[0]()
            return
        futures = [self._pool(len(tasks) - 1).submit(task) for task in tasks[1:]]
        try:
            tasks[0]()
        finally:
            started = [future for future in futures if not future.cancel()]
            wait(started)  # they write into arrays this call returns
        for future in started:
            future.result()


_workers = _Workers()


def _spans(count, parts):
    """``parts`` contiguous, balanced [start, stop) ranges covering range(count)."""
    return [(count * i // parts, count * (i + 1) // parts) for i in range(parts)]


def _thread_count(items, elements_per_item):
    """Threads worth using for ``items`` independent pieces of ``elements_per_item`` elements each."""
    by_work = items * elements_per_item // MIN_ELEMENTS_PER_THREAD
    return max(1, min(get_num_threads(), items, by_work))


def _split(kernel, count, elements_per_item, *args):
    """Run ``kernel(*args, start, stop)`` on contiguous ranges covering range(count), side by side.

    There are a few more ranges than threads; each thread takes the next
    range left until none is, which evens out threads slowed by other work.
    """
    threads = _thread_count(count, elements_per_item)
    if threads == 1:
        kernel(*args, 0, count)
        return
    spans = iter(_spans(count, min(count, RANGES_PER_THREAD * threads)))  # next() on it is atomic (GIL)

    def drain():
        for start, stop in spans:
            kernel(*args, start, stop)
    _workers.run([drain] * threads)


def _out_size(size, window, stride, pad):
    return (size + 2 * pad - window) // stride + 1


# --------------------------------------------------------------------------- im2col / col2im

def _by_lines(channels, filter_h, filter_w, out_w):
    """Whether the line-ordered loops suit: windows with no more taps than a line has windows."""
    return channels * filter_h * filter_w <= out_w


def im2col(x, filter_h, filter_w, stride, pad):
    N, C, H, W = x.shape
    out_w = _out_size(W, filter_w, stride, pad)
    out_hw = _out_size(H, filter_h, stride, pad) * out_w
    col = np.empty((N * out_hw, C * filter_h * filter_w), dtype=x.dtype)
    kernel = _k.im2col_lines if _by_lines(C, filter_h, filter_w, out_w) else _k.im2col_rows
    _split(kernel, N, col.size // max(N, 1), x, filter_h, filter_w, stride, pad, col)
    return col


def col2im(col, x_shape, filter_h, filter_w, stride, pad):
    N, C, _, W = x_shape
    out_w = _out_size(W, filter_w, stride, pad)
    x = np.empty(x_shape, dtype=col.dtype)
    kernel = _k.col2im_lines if _by_lines(C, filter_h, filter_w, out_w) else _k.col2im_rows
    _split(kernel, N, col.size // max(N, 1), col, filter_h, filter_w, stride, pad, x)
    return x


# --------------------------------------------------------------------------- convolution

class _ConvPlan:
    """How a batch is cut: pieces of work, chunks of pieces, groups of chunks, and how many threads.

    A piece (n0, n1, oy0, oy1) is images [n0, n1) and output lines
    [oy0, oy1). Images small enough come several to a piece (all lines, about
    ``CHUNK_BYTES`` of windows); an image that alone makes a wide enough
    product and has more than ``TILE_BYTES`` of windows is cut into pieces of
    a few lines each. A chunk is one piece of several images, or the pieces of
    one image. Forward hands out chunks; backward hands out groups, and sums
    dW and db per group, in order, then over the groups: the result depends on
    the sizes, never on the number of threads. Threads take the next
    unprocessed chunk or group until none is left, so a thread that the OS
    puts aside for a while (other processes) delays nobody.
    """

    def __init__(self, n_images, taps, out_h, out_w, itemsize):
        image_bytes = taps * out_h * out_w * itemsize
        lines = out_h
        if 0 < TILE_BYTES < image_bytes and out_h * out_w >= TILE_MIN_COLUMNS:
            self.images_per_chunk = 1
            lines = max(1, min(out_h, TILE_BYTES // (taps * out_w * itemsize)))
        else:
            self.images_per_chunk = max(1, min(n_images, CHUNK_BYTES // max(image_bytes, 1)))
        chunks = [[(n0, min(n0 + self.images_per_chunk, n_images), oy0, min(oy0 + lines, out_h))
                   for oy0 in range(0, out_h, lines)]
                  for n0 in range(0, n_images, self.images_per_chunk)]
        n_groups = min(len(chunks), SUM_GROUPS)
        self.groups = [[piece for chunk in chunks[a:z] for piece in chunk] for a, z in _spans(len(chunks), n_groups)]
        self.pieces = np.array([piece for group in self.groups for piece in group], dtype=np.int64).reshape(-1, 4)
        self.chunk_bounds = np.cumsum([0] + [len(chunk) for chunk in chunks]).tolist()
        self.group_bounds = np.cumsum([0] + [len(group) for group in self.groups]).tolist()
        self.columns = self.images_per_chunk * lines * out_w  # of the widest piece
        self.threads = max(1, min(n_groups, _thread_count(n_images, taps * out_h * out_w)))

    def run(self, bounds, work, scratch):
        """``work(i, p0, p1, buffers)`` for every range i of pieces [bounds[i], bounds[i + 1]), on
        ``len(scratch)`` threads, each with its own buffers."""
        ranges = iter(range(len(bounds) - 1))  # next() on it is atomic: it runs holding the GIL

        def drain(buffers):
            for i in ranges:
                work(i, bounds[i], bounds[i + 1], buffers)
        _workers.run([lambda b=b: drain(b) for b in scratch])


class _ConvScratch:
    """One thread's flat buffers: unfolded windows, product rows, a padded image plane, folded gradient."""

    __slots__ = ("key", "col", "rows", "plane", "_dcol")

    def __init__(self, key, dtype, taps, n_filters, columns, plane_size):
        self.key = key
        self.col = np.empty(taps * columns, dtype=dtype)
        self.rows = np.empty(n_filters * columns, dtype=dtype)
        self.plane = np.empty(plane_size, dtype=dtype)
        self._dcol = None  # backward only

    @property
    def dcol(self):
        if self._dcol is None:
            self._dcol = np.empty_like(self.col)
        return self._dcol


class ConvCache:
    """What convolution backward needs, the scratch the next forward may reuse, and the book's views."""

    __slots__ = ("x", "W", "stride", "pad", "x_shape", "dtype", "out_hw", "plan", "scratch", "_col")

    def __init__(self, x, W, stride, pad, out_hw, plan, scratch):
        self.x = x  # backward unfolds the input again (the layer keeps it as well)
        self.W = W
        self.stride = stride
        self.pad = pad
        self.x_shape = x.shape
        self.dtype = x.dtype
        self.out_hw = out_hw
        self.plan = plan
        self.scratch = scratch
        self._col = None

    @property
    def col(self):
        """The book's ``col`` of the forward input, made on first access."""
        if self._col is None:
            self._col = im2col(self.x, self.W.shape[2], self.W.shape[3], self.stride, self.pad)
        return self._col

    @property
    def col_W(self):
        """The book's ``col_W``: the filters as columns, (C*FH*FW, FN)."""
        return self.W.reshape(self.W.shape[0], -1).T


# Windows with fewer taps than this get dW as one product per image, summed
# (the first layer: 9 taps; its (16, 9) sum over a chunk's 14112 windows ran
# at a sixth of the speed of per-image products).
PER_IMAGE_DW_MAX_TAPS = 16

# Same-size planes at least this large are unfolded by long shifted copies;
# smaller ones, and other geometries, through a padded copy of the plane.
LONG_COPY_MIN_CELLS = 128


def _long_copies(x_shape, fh, fw, stride, pad):
    H, W = x_shape[2:]
    same_size = stride == 1 and _out_size(H, fh, 1, pad) == H and _out_size(W, fw, 1, pad) == W
    return same_size and H * W >= LONG_COPY_MIN_CELLS


def _plane_size(x_shape, pad):
    return (x_shape[2] + 2 * pad) * (x_shape[3] + 2 * pad)


def _conv_scratch(workspace, threads, dtype, taps, n_filters, columns, plane_size):
    """One scratch per thread, taken from the previous cache when it fits."""
    key = (np.dtype(dtype), taps, n_filters, columns, plane_size)
    previous = getattr(workspace, "scratch", None) or []
    return [s if s.key == key else _ConvScratch(key, dtype, taps, n_filters, columns, plane_size)
            for s in previous[:threads]] + [
        _ConvScratch(key, dtype, taps, n_filters, columns, plane_size) for _ in range(threads - len(previous))]


def conv_forward(x, W, b, stride, pad, workspace):
    N, C, H, Wd = x.shape
    FN, _, FH, FW = W.shape
    out_h, out_w = _out_size(H, FH, stride, pad), _out_size(Wd, FW, stride, pad)
    taps = C * FH * FW
    plan = _ConvPlan(N, taps, out_h, out_w, x.dtype.itemsize)
    scratch = _conv_scratch(workspace, plan.threads, x.dtype, taps, FN, plan.columns, _plane_size(x.shape, pad))
    W_rows = W.reshape(FN, taps)
    long_copies = _long_copies(x.shape, FH, FW, stride, pad)
    out = np.empty((N, FN, out_h * out_w), dtype=x.dtype)

    def work(_, p0, p1, buffers):
        _conv.conv_forward_pieces(x, W_rows, b, out, plan.pieces, p0, p1, FH, FW, stride, pad, long_copies,
                                  GEMM_COLUMNS, buffers.col, buffers.rows, buffers.plane)

    with _single_threaded_blas:
        plan.run(plan.chunk_bounds, work, scratch)
    cache = ConvCache(x, W, stride, pad, (out_h, out_w), plan, scratch)
    return out.reshape(N, FN, out_h, out_w), cache


def conv_backward(dout, cache, W):
    x, stride, pad, plan = cache.x, cache.stride, cache.pad, cache.plan
    N, C = x.shape[:2]
    FN, _, FH, FW = W.shape
    taps = C * FH * FW
    dout = dout.reshape(N, FN, dout.shape[2] * dout.shape[3])
    W_rows = W.reshape(FN, taps)
    long_copies = _long_copies(x.shape, FH, FW, stride, pad)
    per_image_dw = taps < PER_IMAGE_DW_MAX_TAPS
    dx = np.empty(x.shape, dtype=x.dtype)
    dW_T_parts = np.empty((len(plan.groups), taps * FN), dtype=x.dtype)
    db_parts = np.zeros((len(plan.groups), FN), dtype=np.float64)

    def work(g, p0, p1, buffers):
        _conv.conv_backward_pieces(x, W_rows, dout, dx, dW_T_parts[g], db_parts[g], plan.pieces, p0, p1,
                                   FH, FW, stride, pad, long_copies, per_image_dw, GEMM_COLUMNS,
                                   buffers.col, buffers.rows, buffers.dcol, buffers.plane)

    with _single_threaded_blas:
        plan.run(plan.group_bounds, work, cache.scratch)
    dW = np.ascontiguousarray(dW_T_parts.sum(axis=0).reshape(taps, FN).T).reshape(W.shape)
    db = db_parts.sum(axis=0).astype(x.dtype)
    return dx, dW, db


# --------------------------------------------------------------------------- max pooling

class PoolCache:
    """Where each pooling output took its maximum from; the book's ``arg_max`` on request."""

    __slots__ = ("source", "pool_h", "pool_w", "stride", "pad", "x_shape", "dtype", "out_hw")

    def __init__(self, source, pool_h, pool_w, stride, pad, x_shape, dtype, out_hw):
        self.source = source  # like the output: y*W + x of the maximum in its plane, -1 for padding
        self.pool_h = pool_h
        self.pool_w = pool_w
        self.stride = stride
        self.pad = pad
        self.x_shape = x_shape
        self.dtype = dtype
        self.out_hw = out_hw

    @property
    def arg_max(self):
        """The book's flat ``arg_max``: the window index ky*pool_w + kx of each maximum, in (n, y, x, c) order."""
        W = self.x_shape[3]
        out_h, out_w = self.out_hw
        y0 = np.arange(out_h)[:, None] * self.stride - self.pad
        x0 = np.arange(out_w)[None, :] * self.stride - self.pad
        k = (self.source // W - y0) * self.pool_w + (self.source % W - x0)
        k[self.source < 0] = 0  # a padded cell wins only as the window's first cell
        return k.transpose(0, 2, 3, 1).reshape(-1)


def maxpool_forward(x, pool_h, pool_w, stride, pad, workspace):
    N, C, H, W = x.shape
    out_h, out_w = _out_size(H, pool_h, stride, pad), _out_size(W, pool_w, stride, pad)
    out = np.empty((N, C, out_h, out_w), dtype=x.dtype)
    source = getattr(workspace, "source", None)
    if source is None or source.shape != out.shape:
        source = np.empty(out.shape, dtype=np.int32)
    _split(_k.maxpool_forward, N, C * H * W, x, pool_h, pool_w, stride, pad, out, source)
    cache = PoolCache(source, pool_h, pool_w, stride, pad, x.shape, x.dtype, (out_h, out_w))
    return out, cache


def maxpool_backward(dout, cache):
    N, C, H, W = cache.x_shape
    dx = np.empty(cache.x_shape, dtype=cache.dtype)
    _split(_k.maxpool_backward, N, C * H * W, dout, cache.source, dx)
    return dx


# --------------------------------------------------------------------------- ReLU

def relu_forward(x):
    out = np.empty_like(x)
    mask = np.empty(x.shape, dtype=np.bool_)
    _split(_k.relu_forward, x.size, 1, x.reshape(-1), out.reshape(-1), mask.reshape(-1))
    return out, mask


def relu_backward(dout, mask):
    _split(_k.relu_backward, dout.size, 1, dout.reshape(-1), mask.reshape(-1))
    return dout

