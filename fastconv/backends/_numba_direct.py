"""Direct convolution kernels of the numba backend, on an explicit SIMD vector type.

Plain Numba loops leave these kernels scalar. Here a register tile is a
tuple of rows of ``Vector`` values, each an LLVM vector of ``lanes`` floats
(one SIMD register), and intrinsics emit its loads, stores and fused
multiply-adds with a broadcast operand: the code the C compilers make of
the same tile.

Sizes that must be compile-time constants (tile rows and columns, lanes,
channel tiles) travel as *tokens*: tuples of zeros whose length is the size
(``token(8)``). A tuple's length is part of its Numba type, so each layer's
tile shape gets its own compiled specialization, chosen by ordinary
dispatch and cached on disk like any other signature.

The algorithm, the layouts and every size come from ``fastconv._plan``
(shared with the cython backend): forward and backward-data compute an
output *grid* over zero-padded input planes with a tile of output channels x
vectors of grid positions, started from the bias; backward-weights keeps one
vector of output channels per input channel of a channel tile and streams
over an image's pixels. Each kernel call is one thread's share of a pass: it
takes images (grid passes) or image groups (backward-weights) from a shared
counter until none is left, so which thread runs a task never changes its
arithmetic. Forward and backward-data run the same grid pass
(``_grid_image``); where backward-data takes the grid tile it runs inside the
backward-weights kernel, image after image, so that each image's ``dout`` is
read from memory once. Layers whose tiles have the same shape share one
compiled specialization.

With ``NUMBA_DISABLE_JIT=1`` the intrinsics are replaced by NumPy stand-ins
taking the same arguments (a tile is then a (rows, columns, lanes) array).
"""
import functools
import platform
import threading

import numpy as np
from numba import config, literal_unroll, types
from numba import uint64 as _ix

from fastconv import _plan
from fastconv.backends._numba_kernels import _inlined, _kernel, _unless_masked

try:
    import llvmlite.binding as _llvm
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic, models, register_model
except ImportError as exc:  # the numba backend is reported unavailable with this reason
    raise ImportError(f"the numba backend needs numba's extension API and llvmlite: {exc}") from exc

# The instruction-set variant of fastconv._plan the kernels are planned for; None: the CPU's.
# Tests set "avx2" or "generic" to run those variants' tiles and widths on any x86-64 CPU.
VARIANT = None


@functools.lru_cache(maxsize=1)  # asking LLVM costs about 25 µs, and every convolution needs the answer
def host_variant():
    """"avx512" with AVX-512F, "avx2" with AVX2 and FMA, else "generic" (16-byte vectors)."""
    try:
        features = _llvm.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot tell on this platform
        return "generic"
    if features.get("avx512f"):
        return "avx512"
    if features.get("avx2") and features.get("fma"):
        return "avx2"
    return "generic"


def variant():
    return VARIANT or host_variant()


def token(size):
    """A compile-time size for the kernels: a tuple of ``size`` zeros."""
    return (0,) * size


_ONE = token(1)  # a tile of one row or one column


# --------------------------------------------------------------------------- the vector type

class Vector(types.Type):
    """``lanes`` values of ``dtype`` held in one SIMD register."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"Vector({dtype}, {lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


def _tile_type(dtype, rows, columns, lanes):
    """rows x columns vectors: a tuple of rows, each a tuple of vectors."""
    return types.UniTuple(types.UniTuple(Vector(dtype, lanes), columns), rows)


def _address(context, builder, array_type, array, index, vector_type=None):
    """Pointer to array[index] (as a pointer to a vector when ``vector_type`` is given)."""
    pointer = builder.gep(context.make_array(array_type)(context, builder, array).data, [index])
    return pointer if vector_type is None else builder.bitcast(pointer, vector_type.as_pointer())


def _fma(builder, a, b, c):
    """a * b + c, rounded once."""
    vt = a.type
    suffix = "f32" if isinstance(vt.element, ir.FloatType) else "f64"
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]),
                                              f"llvm.fma.v{vt.count}{suffix}")
    return builder.call(function, [a, b, c])


def _splat(builder, vector_type, value):
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(one, one, zeros)


def _at(builder, index, step, j):
    return builder.add(index, builder.mul(step, ir.Constant(step.type, j)))


def _tile_shape(tile_type):
    return tile_type.count, tile_type.dtype.count


@intrinsic
def _tile_splat(typingctx, array, index, rows, columns, lanes):
    tile = _tile_type(array.dtype, rows.count, columns.count, lanes.count)
    sig = tile(array, types.intp, rows, columns, lanes)

    def codegen(context, builder, sig, args):
        vector_type = context.get_value_type(tile.dtype.dtype)
        value = ir.Constant(context.get_value_type(tile), ir.Undefined)
        for r in range(tile.count):
            at = builder.add(args[1], ir.Constant(args[1].type, r))
            vector = _splat(builder, vector_type, builder.load(_address(context, builder, sig.args[0], args[0], at)))
            for c in range(tile.dtype.count):
                value = builder.insert_value(value, vector, [r, c])
        return value
    return sig, codegen


def _load_tile(context, builder, array_type, array, index, row_step, tile, mask=None):
    """The tile at array[index:] (rows ``row_step`` apart); with ``mask`` (an array of array_type), zeros
    where the mask's value at the same place is <= 0."""
    vector_type = context.get_value_type(tile.dtype.dtype)
    align = context.get_abi_alignment(vector_type.element)
    lane_step = ir.Constant(index.type, vector_type.count)
    zeros = ir.Constant(vector_type, None)
    value = ir.Constant(context.get_value_type(tile), ir.Undefined)
    for r in range(tile.count):
        for c in range(tile.dtype.count):
            at = _at(builder, _at(builder, index, row_step, r), lane_step, c)
            vector = builder.load(_address(context, builder, array_type, array, at, vector_type), align=align)
            if mask is not None:  # "<=" is ordered: a NaN in the mask keeps the value, as _unless_masked does
                y = builder.load(_address(context, builder, array_type, mask, at, vector_type), align=align)
                vector = builder.select(builder.fcmp_ordered("<=", y, zeros), zeros, vector)
            value = builder.insert_value(value, vector, [r, c])
    return value


@intrinsic
def _tile_load(typingctx, array, index, row_step, rows, columns, lanes):
    tile = _tile_type(array.dtype, rows.count, columns.count, lanes.count)
    sig = tile(array, types.intp, types.intp, rows, columns, lanes)

    def codegen(context, builder, sig, args):
        return _load_tile(context, builder, sig.args[0], args[0], args[1], args[2], tile)
    return sig, codegen


@intrinsic
def _tile_load_masked(typingctx, array, mask, index, row_step, rows, columns, lanes):
    tile = _tile_type(array.dtype, rows.count, columns.count, lanes.count)
    sig = tile(array, mask, types.intp, types.intp, rows, columns, lanes)

    def codegen(context, builder, sig, args):
        return _load_tile(context, builder, sig.args[0], args[0], args[2], args[3], tile, mask=args[1])
    return sig, codegen


@intrinsic
def _tile_store(typingctx, array, index, row_step, tile):
    sig = types.void(array, types.intp, types.intp, tile)

    def codegen(context, builder, sig, args):
        rows, columns = _tile_shape(sig.args[3])
        vector_type = context.get_value_type(sig.args[3].dtype.dtype)
        align = context.get_abi_alignment(vector_type.element)
        lane_step = ir.Constant(args[1].type, vector_type.count)
        for r in range(rows):
            for c in range(columns):
                at = _at(builder, _at(builder, args[1], args[2], r), lane_step, c)
                pointer = _address(context, builder, sig.args[0], args[0], at, vector_type)
                builder.store(builder.extract_value(args[3], [r, c]), pointer, align=align)
        return context.get_dummy_value()
    return sig, codegen


def _add_outer_product(context, builder, tile_type, value, vectors, row_scalar):
    """The tile ``value`` plus row_scalar(r) * vectors[0][c] in each row r and column c."""
    rows, columns = _tile_shape(tile_type)
    vector_type = context.get_value_type(tile_type.dtype.dtype)
    for r in range(rows):
        broadcast = _splat(builder, vector_type, row_scalar(r))
        for c in range(columns):
            product = _fma(builder, broadcast, builder.extract_value(vectors, [0, c]),
                           builder.extract_value(value, [r, c]))
            value = builder.insert_value(value, product, [r, c])
    return value


@intrinsic
def _tile_outer_fma(typingctx, tile, vectors, array, index, step):
    sig = tile(tile, vectors, array, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        value, vectors, array, index, step = args

        def row_scalar(r):
            return builder.load(_address(context, builder, sig.args[2], array, _at(builder, index, step, r)))
        return _add_outer_product(context, builder, sig.args[0], value, vectors, row_scalar)
    return sig, codegen


@intrinsic
def _tile_gather_fma(typingctx, tile, vectors, array, base, offsets, first):
    sig = tile(tile, vectors, array, types.intp, offsets, types.intp)

    def codegen(context, builder, sig, args):
        value, vectors, array, base, offsets, first = args

        def row_scalar(r):
            # offsets are int64, as the index
            offset = builder.load(_address(context, builder, sig.args[4], offsets,
                                           builder.add(first, ir.Constant(first.type, r))))
            return builder.load(_address(context, builder, sig.args[2], array, builder.add(base, offset)))
        return _add_outer_product(context, builder, sig.args[0], value, vectors, row_scalar)
    return sig, codegen


@intrinsic
def _tile_transpose(typingctx, tile):
    """A square tile of one column (lanes rows of one vector) transposed: log2(lanes) stages of two-vector
    shuffles, each swapping the off-diagonal b x b blocks of every 2b x 2b block (as in the C kernels)."""
    rows, columns = _tile_shape(tile)
    if columns != 1 or rows != tile.dtype.dtype.lanes:
        return None
    sig = tile(tile)

    def codegen(context, builder, sig, args):
        r = [builder.extract_value(args[0], [i, 0]) for i in range(rows)]
        b = rows // 2
        while b:
            lo = ir.Constant(ir.VectorType(ir.IntType(32), rows), [rows + j - b if j & b else j for j in range(rows)])
            hi = ir.Constant(ir.VectorType(ir.IntType(32), rows), [rows + j if j & b else j + b for j in range(rows)])
            for i in range(rows):
                if not i & b:
                    r[i], r[i + b] = builder.shuffle_vector(r[i], r[i + b], lo), builder.shuffle_vector(r[i], r[i + b], hi)
            b //= 2
        value = ir.Constant(context.get_value_type(sig.return_type), ir.Undefined)
        for i in range(rows):
            value = builder.insert_value(value, r[i], [i, 0])
        return value
    return sig, codegen


@intrinsic
def _take_next(typingctx, counter):
    sig = types.intp(counter)

    def codegen(context, builder, sig, args):
        pointer = _address(context, builder, sig.args[0], args[0], ir.Constant(ir.IntType(64), 0))
        return builder.atomic_rmw("add", pointer, ir.Constant(pointer.type.pointee, 1), "monotonic")
    return sig, codegen


def _tile_splat_py(array, index, rows, columns, lanes):
    return np.repeat(array[index:index + len(rows)], len(columns) * len(lanes)).reshape(
        len(rows), len(columns), len(lanes))


def _tile_load_py(array, index, row_step, rows, columns, lanes):
    size = len(columns) * len(lanes)
    return np.stack([array[index + r * row_step:index + r * row_step + size] for r in range(len(rows))]).reshape(
        len(rows), len(columns), len(lanes))


def _tile_load_masked_py(array, mask, index, row_step, rows, columns, lanes):
    tile = _tile_load_py(array, index, row_step, rows, columns, lanes)
    return np.where(_tile_load_py(mask, index, row_step, rows, columns, lanes) <= 0, 0, tile).astype(array.dtype)


def _tile_store_py(array, index, row_step, tile):
    for r, row in enumerate(tile):
        array[index + r * row_step:index + r * row_step + row.size] = row.reshape(-1)


def _tile_outer_fma_py(tile, vectors, array, index, step):
    return tile + array[index + step * np.arange(len(tile))][:, None, None] * vectors[0]


def _tile_gather_fma_py(tile, vectors, array, base, offsets, first):
    return tile + array[base + offsets[first:first + len(tile)]][:, None, None] * vectors[0]


def _tile_transpose_py(tile):
    return np.ascontiguousarray(tile[:, 0, :].T)[:, None, :]


# Subnormal numbers read and computed as zero (the MXCSR's DAZ and FTZ bits) on a kernel's thread while
# it runs: late in training, gradients hold many subnormal floats, and each multiply-add on one takes a
# slow microcode path (backward ran twice as long). The bits are restored when the kernel returns.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_FLUSH_BITS = 0x8040


def _mxcsr_call(builder, name, slot):
    i8p = ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p]), name)
    builder.call(fn, [builder.bitcast(slot, i8p)])


@intrinsic
def _flush_subnormals(typingctx):
    """Set DAZ and FTZ on this thread; return the state before (0 where there is none to set)."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        if not _X86:
            return ir.Constant(i32, 0)
        slot = cgutils.alloca_once(builder, i32)
        _mxcsr_call(builder, "llvm.x86.sse.stmxcsr", slot)
        saved = builder.load(slot)
        builder.store(builder.or_(saved, ir.Constant(i32, _FLUSH_BITS)), slot)
        _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
        return saved
    return types.uint32(), codegen


@intrinsic
def _restore_fp(typingctx, saved):
    """Put back the state ``_flush_subnormals`` returned."""
    def codegen(context, builder, sig, args):
        if _X86:
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(args[0], slot)
            _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()
    return types.void(types.uint32), codegen


def _flush_subnormals_py():
    return 0  # NumPy's arithmetic in the stand-ins keeps subnormals


def _restore_fp_py(saved):
    pass


_take_lock = threading.Lock()


def _take_next_py(counter):
    with _take_lock:
        value = counter[0]
        counter[0] += 1
    return value


if config.DISABLE_JIT:
    tile_splat, tile_load, tile_load_masked, tile_store, tile_outer_fma, tile_gather_fma, tile_transpose = (
        _tile_splat_py, _tile_load_py, _tile_load_masked_py, _tile_store_py, _tile_outer_fma_py, _tile_gather_fma_py,
        _tile_transpose_py)
    take_next, flush_subnormals, restore_fp = _take_next_py, _flush_subnormals_py, _restore_fp_py
else:
    tile_splat, tile_load, tile_load_masked, tile_store, tile_outer_fma, tile_gather_fma, tile_transpose = (
        _tile_splat, _tile_load, _tile_load_masked, _tile_store, _tile_outer_fma, _tile_gather_fma, _tile_transpose)
    take_next, flush_subnormals, restore_fp = _take_next, _flush_subnormals, _restore_fp
# tile_splat(array, i, rows, columns, lanes)[r][c] = array[i + r] in every lane
# tile_load(array, i, row_step, rows, columns, lanes)[r][c] = array[i + r*row_step + c*lanes :][:lanes]
# tile_load_masked(array, mask, ...): tile_load(array, ...) with zeros where tile_load(mask, ...) <= 0
# tile_store(array, i, row_step, tile): the inverse of tile_load
# tile_outer_fma(tile, vectors, array, i, step)[r][c] = tile[r][c] + array[i + r*step] * vectors[0][c]
# tile_gather_fma(tile, vectors, array, i, offsets, f)[r][c] = tile[r][c] + array[i + offsets[f + r]] * vectors[0][c]
# tile_transpose(tile)[r][0][l] = tile[l][0][r], for a tile of lanes rows of one vector
# take_next(counter): counter[0], incremented atomically (the next task of a pass)
# flush_subnormals() / restore_fp(state): subnormals as zero on this thread, and back


# --------------------------------------------------------------------------- kernels

@_inlined
def _copy_planes(src, mask, first, planes, src_h, src_w, dst, start, size, in_h, in_w, border_h, border_w):
    """Planes [first, first + planes) of ``src`` (flat, src_h x src_w planes) into in_h x in_w planes of
    ``dst`` from ``start``, at offset (border_h, border_w) (negative borders crop the source), with zeros
    everywhere else in dst[start:start + size] (each element written once). ``mask``: empty, or a fused
    ReLU's output of src's shape (flat), whose values <= 0 zero the copied ones."""
    x_lo, x_hi = max(0, border_w), min(in_w, src_w + border_w)  # the columns of a plane row that are copied
    for p in range(planes):
        for row in range(in_h):
            d = start + (p * in_h + row) * in_w
            y = row - border_h
            if y < 0 or y >= src_h:
                for x in range(in_w):
                    dst[_ix(d + x)] = 0
                continue
            s = ((first + p) * src_h + y) * src_w - border_w
            for x in range(x_lo):
                dst[_ix(d + x)] = 0
            if mask.size:
                for x in range(x_lo, x_hi):
                    dst[_ix(d + x)] = _unless_masked(src[_ix(s + x)], mask[_ix(s + x)])
            else:
                for x in range(x_lo, x_hi):
                    dst[_ix(d + x)] = src[_ix(s + x)]
            for x in range(x_hi, in_w):
                dst[_ix(d + x)] = 0
    for i in range(planes * in_h * in_w, size):  # the tail the last grid tiles may read
        dst[_ix(start + i)] = 0


@_inlined
def _grid_pass(planes, start, in_channels, in_h, in_w, weights, bias, kb, fh, fw, grid_tiles, grid, k_tile, vectors,
               lanes):
    """grid[(k, q)] = bias[kb*K + k] + sum over (c, ky, kx) of weights * planes[c, q + ky*in_w + kx], for the
    K = len(k_tile) channels of block kb and grid_tiles * len(vectors) * len(lanes) positions q."""
    K = len(k_tile)
    width = len(vectors) * len(lanes)
    grid_padded = grid_tiles * width
    in_plane = in_h * in_w
    for t in range(grid_tiles):
        q0 = t * width
        acc = tile_splat(bias, kb * K, k_tile, vectors, lanes)
        for c in range(in_channels):
            plane = start + c * in_plane + q0
            for ky in range(fh):
                for kx in range(fw):
                    inputs = tile_load(planes, plane + ky * in_w + kx, 0, _ONE, vectors, lanes)
                    acc = tile_outer_fma(acc, inputs, weights, (((kb * in_channels + c) * fh + ky) * fw + kx) * K, 1)
        tile_store(grid, q0, grid_padded, acc)


@_inlined
def _max4(a, b, c, d):
    """The largest of a window's four cells, a NaN if any is one (as the book's pooling gives it)."""
    m = a
    if b > m or b != b:
        m = b
    if c > m or c != c:
        m = c
    if d > m or d != d:
        m = d
    return m


@_inlined
def _grid_to_nchw(grid, grid_padded, in_w, k0, out, n, relu, pooled):
    """out[n, k0 + k] = the kept positions of grid row block k (the first out_w of every in_w), through a
    ReLU with ``relu``; with ``pooled``, their 2 x 2 max pooling (stride 2) instead."""
    _, K, OH, OW = out.shape
    flat = out.reshape(-1)
    for k in range(min(K - k0, grid.size // grid_padded)):
        for oy in range(OH):
            d = ((n * K + k0 + k) * OH + oy) * OW
            if pooled:
                s = k * grid_padded + 2 * oy * in_w
                for x in range(OW):
                    i = s + 2 * x
                    m = _max4(grid[_ix(i)], grid[_ix(i + 1)], grid[_ix(i + in_w)], grid[_ix(i + in_w + 1)])
                    flat[_ix(d + x)] = _unless_masked(m, m) if relu else m
                continue
            s = k * grid_padded + oy * in_w
            for x in range(OW):
                v = grid[_ix(s + x)]
                flat[_ix(d + x)] = _unless_masked(v, v) if relu else v  # the branch is moved out of the loop


@_kernel
def convolve_images(src, mask, weights, bias, out, counter, image_step, image_size, border_h, border_w, filter_h, filter_w,
                    in_h, in_w, grid_tiles, k_tile, vectors, lanes, relu, pooled, planes, grid):
    """One thread's share of a grid pass over a batch: images taken from ``counter`` until none is left.

    Image n of ``src`` (N, C, h, w), masked by ``mask`` (see ``_copy_planes``),
    is copied into zero-padded planes at
    ``planes[n * image_step:]`` (``image_size`` elements with the tail) and
    convolved with packed ``weights`` (the layouts of fastconv._plan) and
    ``bias`` (padded to whole channel blocks), one block of len(k_tile)
    output channels at a time into the thread's ``grid``, whose kept
    positions are copied to out[n] (NCHW) through a ReLU with ``relu``, or
    with ``pooled`` (inference) max-pooled 2 x 2 into out[n], which then has
    the pooled shape. Forward keeps every image's planes (``image_step`` =
    ``image_size``) for backward; backward-data reuses one thread-private
    image (``image_step`` = 0).
    """
    fp = flush_subnormals()
    n = take_next(counter)
    while n < src.shape[0]:
        _grid_image(src, mask, n, weights, bias, out, n, n * image_step, image_size, border_h, border_w, filter_h,
                    filter_w, in_h, in_w, grid_tiles, k_tile, vectors, lanes, relu, pooled, planes, grid)
        n = take_next(counter)
    restore_fp(fp)


@_inlined
def _grid_image(src, mask, m, weights, bias, out, n, start, image_size, border_h, border_w, filter_h, filter_w, in_h,
                in_w, grid_tiles, k_tile, vectors, lanes, relu, pooled, planes, grid):
    """Image m of ``src`` through the grid pass into out[n] (see ``convolve_images``), its planes at
    planes[start:]."""
    _, C, H, W = src.shape
    K = out.shape[1]
    fh, fw = len(filter_h), len(filter_w)  # compile-time: the taps' loops are unrolled
    grid_padded = grid_tiles * len(vectors) * len(lanes)
    _copy_planes(src.reshape(-1), mask, m * C, C, H, W, planes, start, image_size, in_h, in_w, border_h, border_w)
    for kb in range((K + len(k_tile) - 1) // len(k_tile)):
        _grid_pass(planes, start, C, in_h, in_w, weights, bias, kb, fh, fw, grid_tiles, grid, k_tile, vectors, lanes)
        _grid_to_nchw(grid, grid_padded, in_w, kb * len(k_tile), out, n, relu, pooled)


@_inlined
def _pixel_pass(planes, start, in_channels, in_plane, in_w, weights, bias, kb, fh, fw, grid_tiles, offsets, T,
                c_chunk, k_vectors, pixels, lanes):
    """T[(q, k)] = bias[kb*K + k] + sum over (c, ky, kx) of weights * planes[c, q's input + ky*in_w + kx], for
    the K = len(k_vectors) * len(lanes) channels of block kb and grid_tiles * len(pixels) pixels q (the
    channels-in-lanes tile; ``offsets[q]``: pixel q's input position in a plane). Input channels are
    taken ``c_chunk`` at a time, each chunk's weights staying in the L1 cache over all the tiles."""
    K = len(k_vectors) * len(lanes)
    P = len(pixels)
    for c0 in range(0, in_channels, c_chunk):
        for t in range(grid_tiles):
            q0 = t * P
            if c0 == 0:
                acc = tile_load(bias, kb * K, 0, pixels, k_vectors, lanes)
            else:
                acc = tile_load(T, q0 * K, K, pixels, k_vectors, lanes)
            for c in range(c0, min(c0 + c_chunk, in_channels)):
                plane = start + c * in_plane
                for ky in range(fh):
                    for kx in range(fw):
                        w0 = (((kb * in_channels + c) * fh + ky) * fw + kx) * K
                        acc = tile_gather_fma(acc, tile_load(weights, w0, 0, _ONE, k_vectors, lanes), planes,
                                              plane + ky * in_w + kx, offsets, q0)
            tile_store(T, q0 * K, K, acc)


@_inlined
def _pixels_to_nchw(T, K_tile, k0, conv_w, out, n, relu, pooled):
    """out[n, k0 + k] = column k of T (pixels of a conv_w wide output, K_tile), through a ReLU with
    ``relu``; with ``pooled``, its 2 x 2 max pooling (stride 2) instead."""
    _, K, OH, OW = out.shape
    flat = out.reshape(-1)
    cells = OH * OW
    channels = min(K - k0, K_tile)
    if pooled:
        for oy in range(OH):
            for ox in range(OW):
                i = (2 * oy * conv_w + 2 * ox) * K_tile
                j = i + conv_w * K_tile
                d = (n * K + k0) * cells + oy * OW + ox
                for k in range(channels):  # along T's rows
                    m = _max4(T[_ix(i + k)], T[_ix(i + K_tile + k)], T[_ix(j + k)], T[_ix(j + K_tile + k)])
                    flat[_ix(d + k * cells)] = _unless_masked(m, m) if relu else m
        return
    for k in range(channels):
        d = (n * K + k0 + k) * cells
        for q in range(cells):
            v = T[_ix(q * K_tile + k)]
            flat[_ix(d + q)] = _unless_masked(v, v) if relu else v


@_kernel
def convolve_images_pixels(src, mask, weights, bias, out, counter, image_step, image_size, border_h, border_w, filter_h,
                           filter_w, in_h, in_w, grid_tiles, offsets, c_chunk, k_vectors, pixels, lanes, relu, pooled,
                           planes, T):
    """``convolve_images`` with the channels-in-lanes tile: a block's results go to the thread's ``T``
    (pixels, channels) and are transposed into out[n]."""
    N, C, H, W = src.shape
    K = out.shape[1]
    fh, fw = len(filter_h), len(filter_w)
    K_tile = len(k_vectors) * len(lanes)
    flat = src.reshape(-1)
    fp = flush_subnormals()
    n = take_next(counter)
    while n < N:
        start = n * image_step
        _copy_planes(flat, mask, n * C, C, H, W, planes, start, image_size, in_h, in_w, border_h, border_w)
        for kb in range((K + K_tile - 1) // K_tile):
            _pixel_pass(planes, start, C, in_h * in_w, in_w, weights, bias, kb, fh, fw, grid_tiles, offsets, T,
                        c_chunk, k_vectors, pixels, lanes)
            _pixels_to_nchw(T, K_tile, kb * K_tile, in_w - fw + 1, out, n, relu, pooled)
        n = take_next(counter)
    restore_fp(fp)


def pixel_offsets(tile_pass):
    """Each pixel's input position in a padded plane, for the channels-in-lanes tile's pixels (those past
    the last repeat it)."""
    q = np.minimum(np.arange(tile_pass.grid_padded), tile_pass.out_h * tile_pass.out_w - 1)
    return (q // tile_pass.out_w * tile_pass.in_w + q % tile_pass.out_w).astype(np.int64)


@_inlined
def _transpose_gradient(dout, mask, n, blocks, lanes, dT):
    """dT (blocks, OH*OW, lanes) = image n of dout with channels innermost (zero past the last), with zeros
    where ``mask`` (empty, or a fused ReLU's output, flat) is <= 0."""
    _, K, OH, OW = dout.shape
    V = len(lanes)
    cells = OH * OW
    flat = dout.reshape(-1)
    if K % V:  # lanes past the last channel
        for i in range((blocks - 1) * cells * V, blocks * cells * V):
            dT[_ix(i)] = 0
    for kb in range(blocks):
        k_end = min(K, (kb + 1) * V)
        p0 = 0
        if k_end - kb * V == V:  # squares of V channels x V pixels transposed in registers
            while p0 + V <= cells:
                first = (n * K + kb * V) * cells + p0
                if mask.size:
                    square = tile_load_masked(flat, mask, first, cells, lanes, _ONE, lanes)
                else:
                    square = tile_load(flat, first, cells, lanes, _ONE, lanes)
                tile_store(dT, (kb * cells + p0) * V, V, tile_transpose(square))
                p0 += V
        for p in range(p0, cells):  # consecutive stores: each pixel's vector is written whole
            d = (kb * cells + p) * V - kb * V
            for k in range(kb * V, k_end):
                i = (n * K + k) * cells + p
                dT[_ix(d + k)] = _unless_masked(flat[_ix(i)], mask[_ix(i)]) if mask.size else flat[_ix(i)]


@_inlined
def _channel_sums(dT, blocks, cells, K, lanes, zero_one, lane_sums, db):
    """db[k] += the sum of channel k of dT (blocks, cells, lanes): four running vector sums in dT's dtype,
    then their lanes added into db (float64). ``zero_one``: [0, 1] (a vector add is a multiply-add by 1);
    ``lane_sums``: room for one vector."""
    V = len(lanes)
    for kb in range(blocks):
        base = kb * cells * V
        s0 = s1 = s2 = s3 = tile_splat(zero_one, 0, _ONE, _ONE, lanes)
        p = 0
        while p + 4 <= cells:
            s0 = tile_outer_fma(s0, tile_load(dT, base + p * V, 0, _ONE, _ONE, lanes), zero_one, 1, 0)
            s1 = tile_outer_fma(s1, tile_load(dT, base + (p + 1) * V, 0, _ONE, _ONE, lanes), zero_one, 1, 0)
            s2 = tile_outer_fma(s2, tile_load(dT, base + (p + 2) * V, 0, _ONE, _ONE, lanes), zero_one, 1, 0)
            s3 = tile_outer_fma(s3, tile_load(dT, base + (p + 3) * V, 0, _ONE, _ONE, lanes), zero_one, 1, 0)
            p += 4
        for q in range(p, cells):
            s0 = tile_outer_fma(s0, tile_load(dT, base + q * V, 0, _ONE, _ONE, lanes), zero_one, 1, 0)
        total = tile_outer_fma(tile_outer_fma(s0, s1, zero_one, 1, 0), tile_outer_fma(s2, s3, zero_one, 1, 0),
                               zero_one, 1, 0)
        tile_store(lane_sums, 0, 0, total)
        for k in range(kb * V, min(K, (kb + 1) * V)):
            db[k] += lane_sums[k - kb * V]


@_inlined
def _weight_gradient_taps(packed, start, in_w, dT, blocks, OH, OW, dW, t0, rows, tap_offsets, block_pass, lanes):
    """``_weight_gradient`` for a single input channel: dW (blocks, 1, fh, fw, lanes) += one image's products
    of dT and its padded plane, a tile row per filter tap t0, t0 + 1, ... (at ``tap_offsets`` in the plane):
    the taps' chains of additions overlap in one pass over the pixels."""
    V = len(lanes)
    block_step = len(tap_offsets) * V
    cells = OH * OW * V
    kb = 0
    while kb < blocks:
        pair = len(block_pass) == 2 and kb + 1 < blocks  # constant-folded for one block
        w0 = kb * block_step + t0 * V
        acc = tile_load(dW, w0, V, rows, _ONE, lanes)
        if pair:
            acc2 = tile_load(dW, w0 + block_step, V, rows, _ONE, lanes)
            for oy in range(OH):
                d0 = (kb * OH + oy) * OW * V
                p0 = start + oy * in_w
                for ox in range(OW):
                    d = tile_load(dT, d0 + ox * V, 0, _ONE, _ONE, lanes)
                    d2 = tile_load(dT, d0 + cells + ox * V, 0, _ONE, _ONE, lanes)
                    acc = tile_gather_fma(acc, d, packed, p0 + ox, tap_offsets, t0)
                    acc2 = tile_gather_fma(acc2, d2, packed, p0 + ox, tap_offsets, t0)
            tile_store(dW, w0 + block_step, V, acc2)
        else:
            for oy in range(OH):
                d0 = (kb * OH + oy) * OW * V
                p0 = start + oy * in_w
                for ox in range(OW):
                    d = tile_load(dT, d0 + ox * V, 0, _ONE, _ONE, lanes)
                    acc = tile_gather_fma(acc, d, packed, p0 + ox, tap_offsets, t0)
        tile_store(dW, w0, V, acc)
        kb += 2 if pair else 1


@_inlined
def _weight_gradient(packed, start, C, c0, in_h, in_w, dT, blocks, OH, OW, fh, fw, dW, rows, block_pass, lanes):
    """dW (blocks, C, fh, fw, lanes) += one image's products of dT and its padded planes (from ``start``).

    A tile holds one accumulator per input channel c0, c0 + 1, ...
    With ``block_pass`` a token of 2, two blocks of output channels go
    through one pass over the pixels, each x value loaded feeding both;
    every sum is the same.
    """
    V = len(lanes)
    in_plane = in_h * in_w
    x_step, w_step, columns = in_plane, fh * fw * V, fw
    block_step = C * fh * fw * V
    cells = OH * OW * V
    kb = 0
    while kb < blocks:
        pair = len(block_pass) == 2 and kb + 1 < blocks  # constant-folded for one block
        for ky in range(fh):
            for kx in range(columns):
                w0 = (((kb * C + c0) * fh + ky) * fw + kx) * V
                acc = tile_load(dW, w0, w_step, rows, _ONE, lanes)
                if pair:
                    acc2 = tile_load(dW, w0 + block_step, w_step, rows, _ONE, lanes)
                    for oy in range(OH):
                        d0 = (kb * OH + oy) * OW * V
                        p0 = start + c0 * in_plane + (oy + ky) * in_w + kx
                        for ox in range(OW):
                            d = tile_load(dT, d0 + ox * V, 0, _ONE, _ONE, lanes)
                            d2 = tile_load(dT, d0 + cells + ox * V, 0, _ONE, _ONE, lanes)
                            acc = tile_outer_fma(acc, d, packed, p0 + ox, x_step)
                            acc2 = tile_outer_fma(acc2, d2, packed, p0 + ox, x_step)
                    tile_store(dW, w0 + block_step, w_step, acc2)
                else:
                    for oy in range(OH):
                        d0 = (kb * OH + oy) * OW * V
                        p0 = start + c0 * in_plane + (oy + ky) * in_w + kx
                        for ox in range(OW):
                            d = tile_load(dT, d0 + ox * V, 0, _ONE, _ONE, lanes)
                            acc = tile_outer_fma(acc, d, packed, p0 + ox, x_step)
                tile_store(dW, w0, w_step, acc)
        kb += 2 if pair else 1


@_kernel
def weight_gradient_groups(packed, dout, mask, dW, db, dx, weights_t, zeros, counter, group_bounds, image_step, C, fh,
                           fw, in_h, in_w, c_sizes, c_repeats, tap_offsets, block_pass, lanes, dx_pass, dT,
                           planes, grid):
    """One thread's share of backward-weights: image groups taken from ``counter`` until none is left.

    Group g (images group_bounds[g] to group_bounds[g + 1], in order) sums
    into dW[g] (blocks, C, fh, fw, lanes) and db[g] (float64). ``packed``
    holds forward's padded planes, ``image_step`` elements per image. The
    input channels are cut into tiles: c_repeats[i] tiles of len(c_sizes[i])
    channels for each i, in order. Unless ``tap_offsets`` is None (one
    input channel: each filter tap's position in a padded plane), the tiles
    cut the filter taps instead. ``block_pass``: a token of the blocks of
    output channels in a pass, 1 or 2 (see ``_weight_gradient``). ``mask``:
    empty, or a fused ReLU's output (flat): dout counts as zero where it is
    <= 0. Each image's dout is transposed into the thread's ``dT``, its
    channel sums go to db, and dW is computed from dT.

    Unless ``dx_pass`` is None, each image's dx follows, from the same
    dout while it is in cache: the grid pass ``dx_pass`` (borders,
    filter_h and filter_w tokens, in_h, in_w, grid_tiles, k_tile and vectors
    tokens, as ``convolve_images`` takes them) with the transposed and
    flipped filters ``weights_t``, the thread's ``planes`` and ``grid``.
    """
    _, K, OH, OW = dout.shape
    V = len(lanes)
    blocks = (K + V - 1) // V
    zero_one = np.arange(2).astype(dout.dtype)
    lane_sums = np.empty(V, dtype=dout.dtype)
    fp = flush_subnormals()
    g = take_next(counter)
    while g < len(group_bounds) - 1:
        dW_group = dW[g]
        db_group = db[g]
        dW_group[:] = 0
        db_group[:] = 0
        for n in range(group_bounds[g], group_bounds[g + 1]):
            _transpose_gradient(dout, mask, n, blocks, lanes, dT)
            _channel_sums(dT, blocks, OH * OW, K, lanes, zero_one, lane_sums, db_group)
            c0 = 0  # the tile's first input channel, or with tap_offsets its first tap
            i = 0
            for c_tile in literal_unroll(c_sizes):  # tiles of different sizes are different types
                for _ in range(c_repeats[i]):
                    if tap_offsets is not None:  # pruned when compiled for None
                        _weight_gradient_taps(packed, n * image_step, in_w, dT, blocks, OH, OW, dW_group, c0, c_tile,
                                              tap_offsets, block_pass, lanes)
                    else:
                        _weight_gradient(packed, n * image_step, C, c0, in_h, in_w, dT, blocks, OH, OW, fh, fw,
                                         dW_group, c_tile, block_pass, lanes)
                    c0 += len(c_tile)
                i += 1  # noqa: SIM113  (literal_unroll loops cannot enumerate)
            if dx_pass is not None:  # pruned when compiled for a None dx_pass
                border_h, border_w, filter_h, filter_w, dx_in_h, dx_in_w, grid_tiles, k_tile, vectors = dx_pass
                _grid_image(dout, mask, n, weights_t, zeros, dx, n, 0, planes.size, border_h, border_w,
                            filter_h, filter_w, dx_in_h, dx_in_w, grid_tiles, k_tile, vectors, lanes, False, False,
                            planes, grid)
        g = take_next(counter)
    restore_fp(fp)


def channel_tile_runs(channel_tiles, taps, most_rows):
    """fastconv._plan's channel tiles as runs of one size: (a token per size, the number of tiles of each,
    whether the tiles cut the ``taps`` filter taps instead: for one input channel). Tiles of more than
    ``most_rows`` rows are cut into tiles of that many (each row's sum stays the same)."""
    one_channel = channel_tiles == ((0, 1),)
    if one_channel:
        channel_tiles = ((0, taps),)
    sizes, repeats = [], []
    counts = [piece for _, count in channel_tiles
              for piece in [most_rows] * (count // most_rows) + ([count % most_rows] if count % most_rows else [])]
    for count in counts:
        if sizes and len(sizes[-1]) == count:
            repeats[-1] += 1
        else:
            sizes.append(token(count))
            repeats.append(1)
    return tuple(sizes), np.array(repeats, dtype=np.int64), one_channel


def tap_offsets(filter_h, filter_w, in_w):
    """Each filter tap's position in a padded plane of width ``in_w``, tap by tap (ky, then kx)."""
    return np.array([ky * in_w + kx for ky in range(filter_h) for kx in range(filter_w)], dtype=np.int64)


def weight_gradient_to_nchw(dW_sum, filters):
    """dW (blocks, C, fh, fw, lanes) summed over groups, as (K, C, fh, fw) filters."""
    blocks, C, fh, fw, lanes = dW_sum.shape
    return np.ascontiguousarray(dW_sum.transpose(0, 4, 1, 2, 3).reshape(blocks * lanes, C, fh, fw)[:filters])


def plan(x_shape, w_shape, stride, pad, dtype):
    """fastconv._plan's plan for this CPU (or the forced ``VARIANT``)."""
    return _plan.conv_plan(x_shape, w_shape, stride, pad, dtype, variant())
