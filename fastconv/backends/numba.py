"""The numba backend: jitted loops for convolution, pooling and ReLU.

Threading: the jitted kernels are serial and release the GIL; this module
runs one kernel call per thread on a small pool of Python threads
(``_numba_pool``), the calling thread included. How many threads a call
wakes is ``fastconv._threads.threads_for`` (at most ``get_num_threads()``;
for convolutions the plan's ``forward_threads()``, ``backward_threads()``
and ``backward_data_threads()``). Pooling and ReLU cut the batch into
contiguous ranges of images (ReLU: of elements), each thread taking the
next range left; the convolutions' kernels take their images (forward) or
image groups (backward) from a shared counter inside the compiled code. A
task writes only its own images, so no two threads ever add into the same
memory. An idle pool thread polls for the next call, without the GIL, for
``fastconv._threads.POLL_MICROSECONDS``, then sleeps on a condition
variable. No environment variable or other library's thread pool is
touched (the unfolded convolutions and the affine products hold the BLAS to
one thread while they run, restoring it afterwards).

Convolutions follow the plan of ``fastconv._plan`` (shared with the cython
backend), which decides the tiles, the pairing of output-channel blocks,
the channel tiles and every buffer's size; the kernels are in
``_numba_forward`` and ``_numba_backward``, on the SIMD intrinsics of
``_numba_simd``. Geometries the plan does not take (stride > 1, pad of the
filter size or more) use the book's unfolded product. The book's ``col``
and ``col_W`` stay available as cache attributes, ``col`` computed on first
access.

Buffers: outputs (``out``, ``dx``, ``dW``, ``db``, ``mask``, ``col``,
``arg_max``) are always new arrays, since the caller may keep them. Scratch
buffers and the pooling indices live in the cache and are taken over by the
next forward call of the same layer (its previous cache comes back as
``workspace``) when their shapes and dtype still fit; otherwise they are
allocated anew.

Results do not depend on the number of threads: a convolution computes each
image the same way whichever thread takes it, and sums its gradients over a
fixed sequence of image groups, in order.
"""
import contextlib

import numpy as np

try:
    import numba  # noqa: F401  (the kernels module needs it; fail here with a clear reason)
except Exception as exc:  # a broken install can raise more than ImportError
    raise ImportError(f"the numba backend needs a working numba (pip install numba): {exc}") from exc

from fastconv import _plan
from fastconv._checks import output_size as _out_size
from fastconv._threads import threads_for
from fastconv.backends import _numba_backward as _backward
from fastconv.backends import _numba_forward as _forward
from fastconv.backends import _numba_kernels as _k
from fastconv.backends import _numba_pool as _pool
from fastconv.backends import _numba_simd as _simd
from fastconv.backends._blas import affine_backward, affine_forward  # noqa: F401  (part of the interface)
from fastconv.backends._blas import single_threaded_blas as _single_threaded_blas
from fastconv.backends._shared import PoolCache

NAME = "numba"

# The compiled kernels read subnormal numbers as zero on their own threads on x86 (MXCSR); elsewhere, and
# in the pure-Python stand-ins (NUMBA_DISABLE_JIT=1), which compute with NumPy, they keep them.
FLUSHES_SUBNORMALS = _simd._X86 and not numba.config.DISABLE_JIT

# Pooling and ReLU cut their work into this many ranges per thread.
RANGES_PER_THREAD = 4


# --------------------------------------------------------------------------- SIMD variants

_variant = None  # forced by _force_variant; None: the CPU's


def simd_variant():
    """The instruction set the direct kernels' tiles and vector widths are planned for ("avx512", "avx2"
    or "generic")."""
    return _variant or _simd.host_variant()


def available_variants():
    """The variants this CPU runs, best first: all of them (LLVM splits a wider vector than the CPU's)."""
    return _plan.VARIANTS


@contextlib.contextmanager
def _force_variant(name):
    """Plan the direct kernels for variant ``name`` inside the block (for tests and benchmarks)."""
    global _variant
    if name not in _plan.VARIANTS:
        raise ValueError(f"variant {name!r} is not one of {', '.join(_plan.VARIANTS)}")
    previous, _variant = _variant, name
    try:
        yield name
    finally:
        _variant = previous


def _conv_plan(x_shape, w_shape, stride, pad, dtype):
    """fastconv._plan's plan for the variant in use."""
    return _plan.conv_plan(x_shape, w_shape, stride, pad, dtype, simd_variant())


# --------------------------------------------------------------------------- threads

_workers = _pool.Pool("fastconv-numba")


def _spans(count, parts):
    """``parts`` contiguous, balanced [start, stop) ranges covering range(count)."""
    return [(count * i // parts, count * (i + 1) // parts) for i in range(parts)]


def _split(kind, work, kernel, count, *args):
    """Run ``kernel(*args, start, stop)`` on contiguous ranges covering range(count), side by side, on
    ``threads_for(count, work, kind)`` threads.

    There are a few more ranges than threads; each thread takes the next
    range left until none is, which evens out threads slowed by other work.
    """
    threads = threads_for(count, work, kind)
    if threads == 1:
        kernel(*args, 0, count)
        return
    spans = iter(_spans(count, min(count, RANGES_PER_THREAD * threads)))  # next() on it is atomic (GIL)

    def drain():
        for start, stop in spans:
            kernel(*args, start, stop)
    _workers.run([drain] * threads)


# --------------------------------------------------------------------------- im2col / col2im

def im2col(x, filter_h, filter_w, stride, pad):
    N, C, H, W = x.shape
    out_h, out_w = _out_size(H, filter_h, stride, pad), _out_size(W, filter_w, stride, pad)
    col = np.empty((N * out_h * out_w, C * filter_h * filter_w), dtype=x.dtype)
    _split("unfold", col.size, _k.im2col_lines, N, x, filter_h, filter_w, stride, pad, out_h, out_w, col)
    return col


def col2im(col, x_shape, filter_h, filter_w, stride, pad):
    N, _, H, W = x_shape
    out_h, out_w = _out_size(H, filter_h, stride, pad), _out_size(W, filter_w, stride, pad)
    x = np.empty(x_shape, dtype=col.dtype)
    _split("unfold", col.size, _k.col2im_lines, N, col, filter_h, filter_w, stride, pad, out_h, out_w, x)
    return x


# --------------------------------------------------------------------------- convolution

class ConvCache:
    """What convolution backward needs: the plan, a private copy of the input, and reusable buffers.

    Direct kernels keep the forward's padded input planes (``packed``);
    other geometries keep the book's ``col``. Either way backward never reads
    the caller's ``x``, which may change in place after forward. The next
    forward call of the same layer takes the buffers over (this cache then
    refuses backward).
    """

    __slots__ = ("plan", "stride", "pad", "x_shape", "dtype", "out_hw", "packed", "scratch", "_col", "_col_W")

    def __init__(self, plan, W, packed, col, scratch):
        self.plan = plan
        self.stride = plan.stride
        self.pad = plan.pad
        self.x_shape = (plan.batch, plan.channels, plan.height, plan.width)
        self.dtype = plan.dtype
        self.out_hw = (plan.out_h, plan.out_w)
        self.packed = packed
        self.scratch = scratch
        self._col = col
        self._col_W = W.reshape(W.shape[0], -1).T

    @property
    def col(self):
        """The book's ``col`` of the forward input, made on first access."""
        if self._col is None:
            fwd, p = self.plan.forward, self.plan
            images = self._buffers().reshape(p.batch, fwd.image_stride)[:, :fwd.image_elements]
            planes = images.reshape(p.batch, p.channels, fwd.in_h, fwd.in_w)
            x = planes[:, :, p.pad:p.pad + p.height, p.pad:p.pad + p.width]
            self._col = im2col(np.ascontiguousarray(x), p.filter_h, p.filter_w, p.stride, p.pad)
        return self._col

    @property
    def col_W(self):
        """The book's ``col_W``: the forward's filters as columns, (C*FH*FW, FN)."""
        return self._col_W

    def _buffers(self):
        if self.plan.direct and self.packed is None:
            raise ValueError("this convolution cache was reused as the workspace of a later forward call; "
                             "call backward with the cache of the latest forward call")
        return self.packed

    def take_over(self, plan):
        """The packed-input buffer and thread scratch for ``plan`` when they fit; this cache gives them up."""
        packed, scratch = self.packed, self.scratch
        self.packed, self.scratch = None, {}
        if packed is None or not plan.direct or packed.dtype != plan.dtype or packed.size != plan.packed_input:
            packed = None
        return packed, scratch


def _thread_scratch(scratch, key, threads, sizes, dtype):
    """``threads`` lists of arrays of ``sizes`` elements, reusing those under ``key`` when they fit."""
    kept = [buffers for buffers in scratch.get(key, [])
            if [b.size for b in buffers] == list(sizes) and buffers[0].dtype == dtype]
    scratch[key] = kept[:threads] + [[np.empty(size, dtype=dtype) for size in sizes]
                                     for _ in range(threads - len(kept))]
    return scratch[key]


def _run_counted(kernel, leading, trailing, thread_buffers):
    """``kernel(*leading, counter, *trailing, *buffers)`` for each thread's list of buffers, side by side,
    all taking their tasks from one shared counter."""
    counter = np.zeros(1, dtype=np.int64)
    _workers.run([lambda buffers=buffers: kernel(*leading, counter, *trailing, *buffers) for buffers in thread_buffers],
                 counter)


# the kernels' empty mask: dout (or x) used as it is
_NO_MASK = {np.dtype(np.float32): np.empty(0, dtype=np.float32), np.dtype(np.float64): np.empty(0, dtype=np.float64)}


def _pass_kernel(plan, tile_pass, relu, pooled=False):
    """The kernel of a tile pass (grid or channels-in-lanes tile) and its arguments after the borders."""
    token = _simd.token
    geometry = (token(plan.filter_h), token(plan.filter_w), tile_pass.in_h, tile_pass.in_w, tile_pass.grid_tiles)
    if tile_pass.channel_lanes:
        return _forward.convolve_images_pixels, geometry + (
            _forward.pixel_offsets(tile_pass), tile_pass.out_w, tile_pass.c_chunk,
            token(tile_pass.k_tile // plan.lanes), token(tile_pass.vectors), token(plan.lanes), relu, pooled)
    return _forward.convolve_images, geometry + (
        token(tile_pass.k_tile), token(tile_pass.vectors), token(plan.lanes), relu, pooled)


def conv_forward(x, W, b, stride, pad, workspace, relu=False, for_backward=True, pooled=False):
    """With ``pooled`` (inference of a direct geometry only): (out's 2 x 2 max pooling, cache), out itself
    never written."""
    plan = _conv_plan(x.shape, W.shape, stride, pad, x.dtype)
    packed, scratch = workspace.take_over(plan) if isinstance(workspace, ConvCache) else (None, {})
    if not plan.direct:
        out, cache = _unfolded_forward(x, W, b, plan, scratch)
        if relu:  # a pass of its own on this path
            out, _ = relu_forward(out)
        return out, cache
    fwd = plan.forward
    if packed is None and for_backward:
        packed = np.empty(plan.packed_input, dtype=x.dtype)
    bias = np.zeros(fwd.k_padded, dtype=x.dtype)
    bias[:plan.filters] = b
    weights = _plan.pack_forward_weights(plan, W).reshape(-1)
    out_hw = (_out_size(plan.out_h, 2, 2, 0), _out_size(plan.out_w, 2, 2, 0)) if pooled else (plan.out_h, plan.out_w)
    out = np.empty((plan.batch, plan.filters) + out_hw, dtype=x.dtype)
    threads = plan.forward_threads()
    kernel, arguments = _pass_kernel(plan, fwd, relu, pooled)
    if for_backward:  # the batch's padded planes, kept for backward
        grids = _thread_scratch(scratch, "forward", threads, [plan.forward_scratch], x.dtype)
        _run_counted(kernel, (x, _NO_MASK[x.dtype], weights, bias, out), (fwd.image_stride, fwd.image_stride, pad, pad) + arguments,
                     [[packed, grid] for grid, in grids])
    else:  # each image's planes in thread scratch, as backward-data does; packed is handed on unused
        buffers = _thread_scratch(scratch, "inference", threads, [fwd.image_stride, plan.forward_scratch], x.dtype)
        _run_counted(kernel, (x, _NO_MASK[x.dtype], weights, bias, out), (0, fwd.image_stride, pad, pad) + arguments, buffers)
    return out, ConvCache(plan, W, packed, None, scratch)


def conv_backward(dout, cache, W, relu_out=None, input_gradient=True):
    plan = cache.plan
    if not plan.direct:
        if relu_out is not None:  # the ReLU's backward, into a new array (dout is the caller's)
            masked = np.empty_like(dout)
            _split("relu_backward", dout.nbytes, _k.relu_gradient, dout.size, dout.reshape(-1), relu_out.reshape(-1),
                   masked.reshape(-1))
            dout = masked
        return _unfolded_backward(dout, cache, W, input_gradient)
    # a fused ReLU's mask: applied where the kernels read dout
    mask = _NO_MASK[plan.dtype] if relu_out is None else relu_out.reshape(-1)
    packed = cache._buffers()
    fwd, bd = plan.forward, plan.backward_data
    # dW and db: a sum per group of images, then the groups' sums in order (the same for any thread count)
    dW_groups = np.empty((plan.groups, plan.dw_group_elements), dtype=plan.dtype)
    db_groups = np.empty((plan.groups, plan.filters), dtype=np.float64)
    bounds = np.array([first for first, _ in _plan.group_bounds(plan.batch, plan.groups)] + [plan.batch],
                      dtype=np.int64)
    c_sizes, c_repeats, one_channel = _backward.channel_tile_runs(plan.channel_tiles, plan.filter_h * plan.filter_w,
                                                                  plan.weight_tile_rows)
    taps = _backward.tap_offsets(plan.filter_h, plan.filter_w, fwd.in_w) if one_channel else None
    threads = plan.backward_threads()
    # dx: the forward's grid pass over dout, padded by FH - 1 - pad, with the filters transposed and flipped;
    # in the same pass as dW (each image's dout read once) where backward-data takes the grid tile
    dx = np.empty(cache.x_shape if input_gradient else (0,) + cache.x_shape[1:], dtype=plan.dtype)
    weights_t = _plan.pack_backward_data_weights(plan, W).reshape(-1) if input_gradient else _NO_MASK[plan.dtype]
    zeros = np.zeros(bd.k_padded, dtype=plan.dtype)
    fused_dx = input_gradient and not bd.channel_lanes
    borders = (bd.border_h, bd.border_w)
    bd_kernel, bd_arguments = _pass_kernel(plan, bd, False) if input_gradient else (None, ())
    # the grid pass's geometry (up to its lanes); None: the kernel is compiled without its dx part
    dx_pass = borders + bd_arguments[:7] if fused_dx else None
    # dout transposed (the plan's size; for one input channel it holds the cython kernels' bordered blocks,
    # of which these kernels use the start), then the dx pass's planes and grid, as a pass of its own takes them
    buffers = _thread_scratch(cache.scratch, "weights", threads,
                              [plan.backward_buffers.transposed, bd.image_stride if fused_dx else 0,
                               bd.grid_elements if fused_dx else 0], plan.dtype)
    _run_counted(_backward.weight_gradient_groups,
                 (packed, dout, mask, dW_groups, db_groups, dx, weights_t, zeros),
                 (bounds, fwd.image_stride, plan.channels, plan.filter_h, plan.filter_w, fwd.in_h, fwd.in_w,
                  c_sizes, c_repeats, taps, _simd.token(2 if plan.pair_blocks else 1), _simd.token(plan.lanes),
                  dx_pass), buffers)
    dW_sum = dW_groups.sum(axis=0).reshape(plan.w_blocks, plan.channels, plan.filter_h, plan.filter_w, plan.lanes)
    dW = _backward.weight_gradient_to_nchw(dW_sum, plan.filters)
    db = db_groups.sum(axis=0).astype(plan.dtype)
    if not input_gradient:
        return None, dW, db
    if not fused_dx:  # the channels-in-lanes tile: a pass of its own
        threads = plan.backward_data_threads()
        buffers = _thread_scratch(cache.scratch, "data", threads, [bd.image_stride, bd.grid_elements], plan.dtype)
        _run_counted(bd_kernel, (dout, mask, weights_t, zeros, dx), (0, bd.image_stride) + borders + bd_arguments,
                     buffers)
    return dx, dW, db


def _unfolded_forward(x, W, b, plan, scratch):
    """Geometries the direct kernels do not take (stride > 1, pad of the filter size or more): the book's
    unfolded product, on a one-thread BLAS so that results do not depend on any thread count."""
    col = im2col(x, plan.filter_h, plan.filter_w, plan.stride, plan.pad)
    with _single_threaded_blas:
        rows = col @ W.reshape(plan.filters, -1).T + b
    out = np.ascontiguousarray(rows.reshape(plan.batch, plan.out_h, plan.out_w, plan.filters).transpose(0, 3, 1, 2))
    return out, ConvCache(plan, W, None, col, scratch)


def _unfolded_backward(dout, cache, W, input_gradient):
    plan = cache.plan
    rows = dout.transpose(0, 2, 3, 1).reshape(-1, plan.filters)
    db = rows.sum(axis=0, dtype=np.float64).astype(plan.dtype)
    with _single_threaded_blas:
        dW = (rows.T @ cache.col).reshape(W.shape)
        if not input_gradient:
            return None, dW, db
        dcol = rows @ W.reshape(plan.filters, -1)
    dx = col2im(dcol, cache.x_shape, plan.filter_h, plan.filter_w, plan.stride, plan.pad)
    return dx, dW, db


# --------------------------------------------------------------------------- max pooling

def conv_relu_pool_forward(x, W, b, stride, pad, pool_h, pool_w, pool_stride, pool_pad, workspace):
    book_pooling = (pool_h, pool_w, pool_stride, pool_pad) == (2, 2, 2, 0)
    if book_pooling and _conv_plan(x.shape, W.shape, stride, pad, x.dtype).direct:
        return conv_forward(x, W, b, stride, pad, workspace, True, False, pooled=True)  # pooled in the kernel
    out, cache = conv_forward(x, W, b, stride, pad, workspace, True, False)  # pooled in a pass of its own
    return maxpool_forward(out, pool_h, pool_w, pool_stride, pool_pad, None)[0], cache


def maxpool_forward(x, pool_h, pool_w, stride, pad, workspace):
    N, C, H, W = x.shape
    out_h, out_w = _out_size(H, pool_h, stride, pad), _out_size(W, pool_w, stride, pad)
    out = np.empty((N, C, out_h, out_w), dtype=x.dtype)
    source = getattr(workspace, "source", None)
    if source is None or source.shape != out.shape:
        source = np.empty(out.shape, dtype=np.int32)
    _split("pool", x.size, _k.maxpool_forward, N, x, pool_h, pool_w, stride, pad, out, source)
    cache = PoolCache(source, pool_h, pool_w, stride, pad, x.shape, x.dtype, (out_h, out_w))
    return out, cache


def maxpool_backward(dout, cache):
    dx = np.empty(cache.x_shape, dtype=cache.dtype)
    _split("pool", dx.size, _k.maxpool_backward, dx.shape[0], dout, cache.source, dx)
    return dx


# --------------------------------------------------------------------------- ReLU

def relu_forward(x):
    out = np.empty_like(x)
    mask = np.empty(x.shape, dtype=np.bool_)
    _split("relu_forward", x.nbytes, _k.relu_forward, x.size, x.reshape(-1), out.reshape(-1), mask.reshape(-1))
    return out, mask


def relu_backward(dout, mask):
    _split("relu_backward", dout.nbytes, _k.relu_backward, dout.size, dout.reshape(-1), mask.reshape(-1))
    return dout

