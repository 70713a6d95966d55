"""The compiled backend: Cython and C kernels on fastconv's own thread pool.

Convolutions run as direct convolutions (``fastconv/_ext/dconv_forward.h``,
``dconv_backward.h``): register-tiled kernels over padded image planes, NCHW
in and out, cut into work by the plan of ``fastconv/_plan.py`` (tiles, pairing
of output-channel blocks, buffer sizes, threads), which this module hands to
``fastconv/_ext/_direct.pyx`` whole. They are compiled for several instruction
sets, of which the best one this CPU runs is chosen at import
(``simd_variant()``), once the compiled variants are checked against
``_plan.VARIANTS``, ``VECTOR_BYTES`` and ``REGISTERS``. Geometries the direct
kernels do not cover (stride > 1, a pad of the filter size or more) unfold a
block of images at a time into a cache-sized buffer and multiply it with the
filters there through SciPy's BLAS (``fastconv/_ext/_conv.pyx``);
``conv_engine("im2col")`` forces that path.

Output sizes are computed here (``fastconv._plan.output_size``) and passed to
the extensions, which check them against the arrays they are given.

Threading: every kernel splits its work over at most ``get_num_threads()``
threads of one pool (``fastconv/_ext/fc_pool.c``), as many as
``fastconv._threads.threads_for`` gives for its tasks and work (the
convolutions through the plan's ``forward_threads`` and ``backward_threads``);
idle threads poll for ``fastconv._threads.POLL_MICROSECONDS`` and then sleep;
the GEMMs of the im2col path run inside it on a BLAS held to a single
thread for the duration of the call (its previous setting is restored
afterwards). Nothing process-wide is changed.

Buffers: outputs (``out``, ``dx``, ``dW``, ``db``, ``mask``) are always new
arrays, since the caller may keep them. Scratch buffers, the padded copy of a
convolution's input and the pooling indices live in the cache and are taken
over by the next forward call of the same layer (its previous cache comes
back as ``workspace``) when their dtype matches and they are large enough;
anything else is allocated anew, so batch size and dtype may change between
calls. A cache whose buffers were taken over can no longer run backward.

Results do not depend on the number of threads, bit for bit: each output of
forward and dx is computed by one thread in a fixed order, and dW and db are
summed over fixed groups of images (``fastconv._plan.DW_GROUPS``), in order.
"""
import contextlib

import numpy as np

from fastconv import _plan
from fastconv._checks import relu_mask
from fastconv._threads import POLL_MICROSECONDS, get_num_threads, threads_for
from fastconv.backends._blas import affine_backward, affine_forward  # noqa: F401  (part of the interface)
from fastconv.backends._blas import single_threaded_blas as _single_threaded_blas
from fastconv.backends._shared import PoolCache

try:
    from fastconv._ext import _conv
except ModuleNotFoundError as exc:
    if exc.name and exc.name.split(".")[0] == "scipy":
        raise ImportError("the cython backend needs SciPy for its BLAS: pip install scipy") from exc
    raise
from fastconv._ext import _direct, _im2col, _parallel, _pool, _relu  # noqa: E402

NAME = "cython"

# The im2col path multiplies the windows of several small images at once, about
# this many output pixels per GEMM: small GEMMs waste time packing operands.
GEMM_COLUMNS = 256

# An image with more output pixels than that is unfolded a few output lines at
# a time, about this many bytes of unfolded windows per piece, so that they
# are still in cache when the GEMM reads them (0: whole images).
TILE_BYTES = 1 << 17

CONV_ENGINES = ("direct", "im2col")

_THREADED = _parallel.threaded()
_parallel.set_poll_ns(POLL_MICROSECONDS * 1000)


def _compiled_variants():
    """The variants of ``_plan.VARIANTS`` this CPU runs, once the compiled ones are checked against the plan
    (the order of ``dconv.h``'s list, vector bytes, registers)."""
    if _direct.VARIANTS != _plan.VARIANTS:
        raise ImportError(f"the direct-convolution kernels are compiled for the variants {_direct.VARIANTS}, "
                          f"fastconv._plan has {_plan.VARIANTS}: rebuild the extensions")
    for name in _plan.VARIANTS:
        compiled = _direct.compiled_variant(name)
        expected = (_plan.VECTOR_BYTES[name], _plan.REGISTERS[name])
        if compiled is not None and compiled != expected:
            raise ImportError(f"the {name} kernels are compiled for (vector bytes, registers) {compiled}, "
                              f"fastconv._plan has {expected}: rebuild the extensions")
    return tuple(name for name in _plan.VARIANTS if _direct.available(name))


_VARIANTS = _compiled_variants()
_variant = _VARIANTS[0] if _VARIANTS else None  # None: built without the direct kernels
# The portable variant's 128-bit vectors lose to the BLAS GEMMs of the im2col path (2 to 3 times slower
# with SSE2 on the network's layers), so on such CPUs im2col is the default.
_engine = "im2col" if _variant in ("generic", None) else "direct"

# The direct kernels read subnormal numbers as zero on their own threads (see docs/cython.md).
FLUSHES_SUBNORMALS = True


def simd_variant():
    """The instruction set of the direct convolution kernels in use ("avx512", "avx2" or "generic"; None in a
    build without them)."""
    return _variant


def available_variants():
    """The variants this CPU runs, best first."""
    return _VARIANTS


@contextlib.contextmanager
def _force_variant(name):
    """Run the direct kernels of variant ``name`` inside the block (for tests and benchmarks): the direct
    engine, with that variant's kernels, wherever the direct kernels apply."""
    global _variant, _engine
    if name not in _VARIANTS:
        raise ValueError(f"variant {name!r} is not available on this CPU (available: {', '.join(_VARIANTS)})")
    previous = _variant, _engine
    _variant, _engine = name, "direct"
    try:
        yield name
    finally:
        _variant, _engine = previous


@contextlib.contextmanager
def conv_engine(name):
    """Run convolutions with ``"direct"`` kernels or the ``"im2col"`` path inside the block.

    ``"direct"`` (the default where the CPU has AVX2 or AVX-512) still uses
    im2col for the geometries it does not cover. Backward runs the engine its
    forward ran.
    """
    global _engine
    if name not in CONV_ENGINES:
        raise ValueError(f"engine must be one of {CONV_ENGINES}, got {name!r}")
    previous, _engine = _engine, name
    try:
        yield name
    finally:
        _engine = previous


class ConvCache:
    """What convolution backward needs, and the buffers the next forward may take over.

    ``packed`` (direct engine) holds the forward input's padded planes and ``x``
    (im2col path) a copy of the input: backward never reads the caller's ``x``.
    """

    __slots__ = ("x", "filter_hw", "stride", "pad", "x_shape", "dtype", "out_hw", "plan", "packed", "scratch",
                 "scratch_stride", "dw_groups")

    def __init__(self, x_shape, dtype, filter_hw, stride, pad, out_hw, plan=None, x=None, packed=None,
                 scratch=None, scratch_stride=0, dw_groups=None):
        self.x = x
        self.filter_hw = filter_hw
        self.stride = stride
        self.pad = pad
        self.x_shape = x_shape
        self.dtype = dtype
        self.out_hw = out_hw
        self.plan = plan
        self.packed = packed
        self.scratch = scratch
        self.scratch_stride = scratch_stride
        self.dw_groups = dw_groups


def parallel_threads():
    """Threads the kernels run on now: ``get_num_threads()``, or 1 in a build without threads (asked of the
    pool, which starts its threads for it)."""
    return _parallel.team_size(get_num_threads())


def _most_threads():
    """The most threads a kernel may wake: ``get_num_threads()``, or 1 in a build without threads."""
    return get_num_threads() if _THREADED else 1


def _buffer(owner, name, size, dtype):
    """``owner.name`` if it is a flat ``dtype`` array of at least ``size`` elements, else a new one of ``size``."""
    previous = getattr(owner, name, None)
    if isinstance(previous, np.ndarray) and previous.ndim == 1 and previous.dtype == dtype and previous.size >= size:
        return previous
    return np.empty(max(size, 1), dtype=dtype)


def im2col(x, filter_h, filter_w, stride, pad):
    N, C, H, W = x.shape
    out_h = _plan.output_size(H, filter_h, stride, pad)
    out_w = _plan.output_size(W, filter_w, stride, pad)
    col = np.empty((N * out_h * out_w, C * filter_h * filter_w), dtype=x.dtype)
    threads = threads_for(N, col.size, "unfold", _most_threads())
    scratch = np.empty(threads * col.shape[1] * out_h * out_w, dtype=x.dtype)
    _im2col.im2col(x, col, filter_h, filter_w, stride, pad, out_h, out_w, scratch, threads)
    return col


def col2im(col, x_shape, filter_h, filter_w, stride, pad):
    N, C, H, W = x_shape
    out_h = _plan.output_size(H, filter_h, stride, pad)
    out_w = _plan.output_size(W, filter_w, stride, pad)
    x = np.empty(x_shape, dtype=col.dtype)
    threads = threads_for(N, col.size, "unfold", _most_threads())
    scratch = np.empty(threads * col.size // N, dtype=col.dtype)
    _im2col.col2im(col, x, filter_h, filter_w, stride, pad, out_h, out_w, scratch, threads)
    return x


def _direct_applies(filter_h, filter_w, stride, pad):
    """Whether this geometry runs on the direct kernels now (the engine, the build and the plan agree)."""
    return _engine == "direct" and _variant is not None and _plan.direct_supported(filter_h, filter_w, stride, pad)


def conv_forward(x, W, b, stride, pad, workspace, relu=False, for_backward=True):
    FN, C, FH, FW = W.shape
    N, _, H, Wd = x.shape
    out_h = _plan.output_size(H, FH, stride, pad)
    out_w = _plan.output_size(Wd, FW, stride, pad)
    if N == 0 or FN == 0 or C == 0:
        return (np.zeros((N, FN, out_h, out_w), dtype=x.dtype),
                ConvCache(x.shape, x.dtype, (FH, FW), stride, pad, (out_h, out_w), x=x.copy()))
    if _direct_applies(FH, FW, stride, pad):
        return _direct_forward(x, W, b, stride, pad, workspace, relu, for_backward)
    out, cache = _im2col_forward(x, W, b, stride, pad, workspace, out_h, out_w)
    if relu:  # a pass of its own on this path
        out, _ = relu_forward(out)
    return out, cache


def conv_backward(dout, cache, W, relu_out=None, input_gradient=True):
    if tuple(W.shape[1:]) != (cache.x_shape[1],) + cache.filter_hw or W.shape[0] != dout.shape[1]:
        raise ValueError(f"W has shape {W.shape}, but the forward call used filters of another shape")
    N = cache.x_shape[0]
    if N == 0 or W.shape[0] == 0 or cache.x_shape[1] == 0:
        dx = np.zeros(cache.x_shape, dtype=cache.dtype)
        return dx, np.zeros(W.shape, dtype=cache.dtype), np.zeros(W.shape[0], dtype=cache.dtype)
    if cache.plan is not None:
        return _direct_backward(dout, cache, W, relu_out, input_gradient)
    if relu_out is not None:
        dout = relu_backward(dout.copy(), relu_mask(relu_out))
    return _im2col_backward(dout, cache, W)  # dx always: it comes out of the same pass as dW


def conv_relu_pool_forward(x, W, b, stride, pad, pool_h, pool_w, pool_stride, pool_pad, workspace):
    FN, C, FH, FW = W.shape
    if _direct_applies(FH, FW, stride, pad) and (pool_h, pool_w, pool_stride, pool_pad) == (2, 2, 2, 0):
        return _direct_forward(x, W, b, stride, pad, workspace, True, False,
                               pool=(pool_h, pool_w, pool_stride, pool_pad))
    out, cache = conv_forward(x, W, b, stride, pad, workspace, True, False)  # pooled in a pass of its own
    return maxpool_forward(out, pool_h, pool_w, pool_stride, pool_pad, None)[0], cache


def _take_over(workspace, name, size, dtype):
    """A buffer from the previous cache (which can no longer run backward then), or a new one."""
    buffer = _buffer(workspace, name, size, dtype)
    if workspace is not None and buffer is getattr(workspace, name, None):
        setattr(workspace, name, None)
    return buffer


def _direct_forward(x, W, b, stride, pad, workspace, relu, for_backward, pool=None):
    """(out, cache); with ``pool`` ((pool_h, pool_w, stride, pad) = (2, 2, 2, 0)), (out's max pooling, cache),
    out itself never written."""
    plan = _plan.conv_plan(x.shape, W.shape, stride, pad, x.dtype, _variant)
    most = _most_threads()
    threads = plan.forward_threads(most)
    # one scratch serves forward and backward
    most_threads = max(threads, plan.backward_threads(most))
    scratch_stride = _scratch_stride(plan)
    scratch = _take_over(workspace, "scratch", most_threads * scratch_stride, x.dtype)
    if for_backward:
        packed = _take_over(workspace, "packed", plan.packed_input, x.dtype)
    else:  # each image's planes in thread scratch; the batch's buffer is handed on for a later forward
        packed = getattr(workspace, "packed", None)
    bias = np.zeros(plan.forward.k_padded, dtype=x.dtype)
    bias[:plan.filters] = b
    out_hw = (plan.out_h, plan.out_w)
    if pool is not None:
        pool_h, pool_w, pool_stride, pool_pad = pool
        out_hw = (_plan.output_size(plan.out_h, pool_h, pool_stride, pool_pad),
                  _plan.output_size(plan.out_w, pool_w, pool_stride, pool_pad))
    out = np.empty((plan.batch, plan.filters) + out_hw, dtype=x.dtype)
    _direct.conv_forward(plan, x.reshape(-1), packed if for_backward else None,
                         _packed_weights(W, plan.forward.k_tile, False), bias,
                         None if pool else out.reshape(-1), scratch, scratch_stride, threads, relu,
                         out.reshape(-1) if pool else None, *(out_hw if pool else (0, 0)))
    dw_groups = getattr(workspace, "dw_groups", None)
    cache = ConvCache(x.shape, x.dtype, (plan.filter_h, plan.filter_w), stride, pad, (plan.out_h, plan.out_w),
                      plan=plan, packed=packed,
                      scratch=scratch, scratch_stride=scratch_stride, dw_groups=dw_groups)
    return out, cache


def _packed_weights(W, k_tile, backward_data):
    """``W`` in a tile's layout (see ``_plan.pack_forward_weights``), packed in C."""
    outputs = W.shape[1] if backward_data else W.shape[0]
    packed = np.empty(-(-outputs // k_tile) * k_tile * W.size // outputs, dtype=W.dtype)
    _direct.pack_weights(W, packed, k_tile, backward_data)
    return packed


def _scratch_stride(plan):
    """Elements of one thread's scratch: the larger of forward's and backward's, and room to align it."""
    return max(plan.forward_scratch, plan.backward_scratch) + _direct.SCRATCH_ALIGNMENT // plan.dtype.itemsize


def _direct_backward(dout, cache, W, relu_out, input_gradient):
    plan = cache.plan
    if cache.packed is None:
        raise ValueError("this cache's buffers were taken over by a later forward call (it was passed as its "
                         "workspace): run backward before reusing a cache")
    threads = plan.backward_threads(_most_threads())
    cache.scratch = _buffer(cache, "scratch", threads * cache.scratch_stride, plan.dtype)
    cache.dw_groups = _buffer(cache, "dw_groups", plan.groups * plan.dw_group_elements, plan.dtype)
    db_groups = np.empty(plan.groups * plan.filters, dtype=np.float64)
    dx = np.empty(cache.x_shape, dtype=plan.dtype) if input_gradient else None
    dW = np.empty(W.shape, dtype=plan.dtype)
    db = np.empty(plan.filters, dtype=plan.dtype)
    channel_tiles = np.array(plan.channel_tiles, dtype=np.intc).reshape(-1)
    zeros = np.zeros(plan.backward_data.k_padded, dtype=plan.dtype)
    if plan.one_channel_data:
        weights = _packed_weights(W, plan.lanes, False)
    else:
        weights = _packed_weights(W, plan.backward_data.k_tile, True)
    _direct.conv_backward(plan, channel_tiles, cache.packed, dout.reshape(-1),
                          weights, zeros, None if dx is None else dx.reshape(-1), cache.dw_groups, db_groups,
                          dW.reshape(-1), db, cache.scratch, cache.scratch_stride, threads,
                          None if relu_out is None else relu_out.reshape(-1))
    return dx, dW, db


def _images_per_gemm(batch, out_hw):
    """Images whose windows go into one GEMM: enough for about GEMM_COLUMNS columns."""
    return max(1, min(batch, -(-GEMM_COLUMNS // out_hw)))


def _tile_lines(block, K, out_h, out_w, itemsize):
    """Output lines per piece of work: all of them for a block of several images."""
    if block > 1 or TILE_BYTES <= 0:
        return out_h
    return max(1, min(out_h, TILE_BYTES // (K * out_w * itemsize)))


def _im2col_forward(x, W, b, stride, pad, workspace, out_h, out_w):
    FN, C, FH, FW = W.shape
    N = x.shape[0]
    block = _images_per_gemm(N, out_h * out_w)
    lines = _tile_lines(block, C * FH * FW, out_h, out_w, x.itemsize)
    most = _most_threads()
    pieces = -(-N // block) * -(-out_h // lines)
    threads = threads_for(pieces, N * FN * out_h * out_w, "conv", most)
    # sized for backward too, so that one allocation serves both
    per_thread = _conv.scratch_per_thread(C * FH * FW, FN, block, out_h * out_w)
    most_threads = max(threads, _im2col_backward_threads(N, FN, out_h, out_w, most))
    scratch = _take_over(workspace, "scratch", most_threads * per_thread, x.dtype)
    out = np.empty((N, FN, out_h, out_w), dtype=x.dtype)
    with _single_threaded_blas:
        _conv.conv_forward(x, W.reshape(FN, -1), b, out.reshape(N, FN, out_h * out_w), scratch,
                           FH, FW, stride, pad, out_h, out_w, block, lines, threads)
    cache = ConvCache(x.shape, x.dtype, (FH, FW), stride, pad, (out_h, out_w), x=x.copy(), scratch=scratch,
                      dw_groups=getattr(workspace, "dw_groups", None))
    return out, cache


def _im2col_backward_threads(N, FN, out_h, out_w, most):
    """Threads for the im2col path's backward: one task per group of images."""
    return threads_for(min(N, _plan.DW_GROUPS), N * FN * out_h * out_w, "conv", most)


def _im2col_backward(dout, cache, W):
    FN, C, FH, FW = W.shape
    x = cache.x
    N = x.shape[0]
    out_h, out_w = cache.out_hw
    block = _images_per_gemm(N, out_h * out_w)
    groups = min(N, _plan.DW_GROUPS)
    threads = _im2col_backward_threads(N, FN, out_h, out_w, _most_threads())
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
                            cache.scratch, FH, FW, cache.stride, cache.pad, out_h, out_w, block,
                            _tile_lines(block, C * FH * FW, out_h, out_w, x.itemsize), threads)
    return dx, dW, db


def maxpool_forward(x, pool_h, pool_w, stride, pad, workspace):
    N, C, H, W = x.shape
    out_h = _plan.output_size(H, pool_h, stride, pad)
    out_w = _plan.output_size(W, pool_w, stride, pad)
    out = np.empty((N, C, out_h, out_w), dtype=x.dtype)
    # the cache's source is y * W + x of each maximum in its plane, -1 where padding won (_pool.pyx)
    source = _buffer(workspace, "source", out.size, np.dtype(np.intc))[:out.size]
    _pool.maxpool_forward(x, out, source, pool_h, pool_w, stride, pad, _pool_threads(N * C, x.size))
    return out, PoolCache(source, pool_h, pool_w, stride, pad, x.shape, x.dtype, (out_h, out_w))


def maxpool_backward(dout, cache):
    dx = np.empty(cache.x_shape, dtype=cache.dtype)
    planes = cache.x_shape[0] * cache.x_shape[1]
    _pool.maxpool_backward(dout, cache.source, dx, _pool_threads(planes, dx.size))
    return dx


def _pool_threads(planes, cells):
    """Threads for pooling ``planes`` planes of ``cells`` input cells in all (a task: a few planes)."""
    return threads_for(-(-planes // _pool.TASK_PLANES), cells, "pool", _most_threads())


def relu_forward(x):
    out = np.empty_like(x)
    mask = np.empty(x.shape, dtype=np.bool_)
    threads = threads_for(-(-x.size // _relu.TASK_ELEMENTS), x.nbytes, "relu_forward", _most_threads())
    _relu.relu_forward(x.reshape(-1), out.reshape(-1), mask.reshape(-1).view(np.uint8), threads)
    return out, mask


def relu_backward(dout, mask):
    threads = threads_for(-(-dout.size // _relu.TASK_ELEMENTS), dout.nbytes, "relu_backward", _most_threads())
    _relu.relu_backward(dout.reshape(-1), mask.reshape(-1).view(np.uint8), threads)
    return dout
