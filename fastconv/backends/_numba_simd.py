"""The numba backend's library of LLVM intrinsics: SIMD tiles, the ReLU's mask rule, atomics, the CPU's clock.

Plain Numba loops leave the convolution kernels scalar. Here a register
tile is a tuple of rows of ``Vector`` values, each an LLVM vector of
``lanes`` floats (one SIMD register), and intrinsics emit its loads, stores
and fused multiply-adds with a broadcast operand: the code the C compilers
make of the same tile.

Sizes that must be compile-time constants (tile rows and columns, lanes,
channel tiles) travel as *tokens*: tuples of zeros whose length is the size
(``token(8)``). A tuple's length is part of its Numba type, so each tile
shape gets its own compiled specialization, chosen by ordinary dispatch and
cached on disk like any other signature.

Besides the tiles: ``relu_off`` and ``relu_gated``, the one rule by which a
fused ReLU's output masks a value (``tile_load_masked`` applies the same
rule to vectors); ``take_next``, the atomic counter from which kernel calls
take their tasks; the atomics, time-stamp counter and spin-wait hint of the
thread pool's compiled waiting (``_numba_pool``); and the MXCSR bits that
make subnormal numbers count as zero while a kernel runs.

With ``NUMBA_DISABLE_JIT=1`` the intrinsics are replaced by NumPy stand-ins
taking the same arguments (a tile is then a (rows, columns, lanes) array).
"""
import functools
import platform
import threading

import numpy as np
from numba import config, types

from fastconv._checks import relu_mask as _relu_off_py  # the rule in Python: the stand-in of relu_off

try:
    import llvmlite.binding as _llvm
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic, models, register_model
except ImportError as exc:  # the numba backend is reported unavailable with this reason
    raise ImportError(f"the numba backend needs numba's extension API and llvmlite: {exc}") from exc

# x86 CPUs have the MXCSR (see flush_subnormals) and the pause instruction
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


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


def _address(context, builder, array_type, array, index=None, vector_type=None):
    """Pointer to array[index], array[0] without an index (as a pointer to a vector when ``vector_type`` is
    given)."""
    pointer = context.make_array(array_type)(context, builder, array).data
    if index is not None:
        pointer = builder.gep(pointer, [index])
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


# --------------------------------------------------------------------------- the ReLU's mask rule

def _relu_off_ir(builder, y):
    """Where a ReLU's output (or input) ``y`` (a float or a vector of floats) zeroes the gradient: y <= 0,
    ``fastconv._checks.relu_mask``'s rule. The comparison is ordered, so a NaN y counts as on, as in the
    book's mask ``x <= 0``."""
    return builder.fcmp_ordered("<=", y, ir.Constant(y.type, None))


def _relu_gated_ir(builder, value, y):
    """``value``, or zero where ``_relu_off_ir(y)``: a select, not a branch on the data (which would
    mispredict half the time after a ReLU)."""
    return builder.select(_relu_off_ir(builder, y), ir.Constant(value.type, None), value)


@intrinsic
def _relu_off(typingctx, y):
    """Whether the ReLU is off at ``y``: y <= 0, False for NaN."""
    if not isinstance(y, types.Float):
        return None

    def codegen(context, builder, sig, args):
        return _relu_off_ir(builder, args[0])
    return types.boolean(y), codegen


@intrinsic
def _relu_gated(typingctx, value, y):
    """``value``, or 0 where the ReLU is off at ``y``."""
    if not isinstance(value, types.Float) or not isinstance(y, types.Float):
        return None

    def codegen(context, builder, sig, args):
        return _relu_gated_ir(builder, args[0], args[1])
    return value(value, y), codegen


# --------------------------------------------------------------------------- tiles

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
    where the ReLU is off at the mask's value at the same place."""
    vector_type = context.get_value_type(tile.dtype.dtype)
    align = context.get_abi_alignment(vector_type.element)
    lane_step = ir.Constant(index.type, vector_type.count)
    value = ir.Constant(context.get_value_type(tile), ir.Undefined)
    for r in range(tile.count):
        for c in range(tile.dtype.count):
            at = _at(builder, _at(builder, index, row_step, r), lane_step, c)
            vector = builder.load(_address(context, builder, array_type, array, at, vector_type), align=align)
            if mask is not None:
                y = builder.load(_address(context, builder, array_type, mask, at, vector_type), align=align)
                vector = _relu_gated_ir(builder, vector, y)
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


# --------------------------------------------------------------------------- atomics and the CPU's clock

def _add_one_ir(context, builder, array_type, array, ordering):
    """word[0] += 1 on an int64 array, atomically with the memory ``ordering``; the value before."""
    pointer = _address(context, builder, array_type, array)
    return builder.atomic_rmw("add", pointer, ir.Constant(pointer.type.pointee, 1), ordering)


@intrinsic
def _take_next(typingctx, counter):
    """counter[0], incremented atomically (no ordering with other memory: the tasks' data is not handed
    over through it)."""
    def codegen(context, builder, sig, args):
        return _add_one_ir(context, builder, sig.args[0], args[0], "monotonic")
    return types.intp(counter), codegen


@intrinsic
def add_one(typingctx, word):
    """word[0] += 1, atomically and as a full barrier (sequentially consistent)."""
    def codegen(context, builder, sig, args):
        _add_one_ir(context, builder, sig.args[0], args[0], "seq_cst")
        return context.get_dummy_value()
    return types.void(word), codegen


@intrinsic
def load_acquire(typingctx, word):
    """word[0] (an int64 array), read atomically: another thread's store is seen, not a hoisted copy."""
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_address(context, builder, sig.args[0], args[0]), "acquire", 8)
    return types.int64(word), codegen


@intrinsic
def set_one_and_load(typingctx, flag, word):
    """flag[0] = 1 (an exchange: a full barrier), then word[0]."""
    def codegen(context, builder, sig, args):
        builder.atomic_rmw("xchg", _address(context, builder, sig.args[0], args[0]), ir.Constant(ir.IntType(64), 1),
                           "seq_cst")
        return builder.load_atomic(_address(context, builder, sig.args[1], args[1]), "seq_cst", 8)
    return types.int64(flag, word), codegen


@intrinsic
def ticks(typingctx):
    """The CPU's time-stamp counter (0 where LLVM has none for the target)."""
    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, []), "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


@intrinsic
def pause(typingctx):
    """A spin-wait hint (x86 ``pause``): the polling thread leaves its core's resources to the other."""
    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


# --------------------------------------------------------------------------- subnormals

# Subnormal numbers read and computed as zero (the MXCSR's DAZ and FTZ bits) on a kernel's thread while
# it runs: late in training, gradients hold many subnormal floats, and each multiply-add on one takes a
# slow microcode path (backward ran twice as long). The bits are restored when the kernel returns.
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


# --------------------------------------------------------------------------- NumPy stand-ins

def _relu_gated_py(value, y):
    return 0 if _relu_off_py(y) else value


def _tile_splat_py(array, index, rows, columns, lanes):
    return np.repeat(array[index:index + len(rows)], len(columns) * len(lanes)).reshape(
        len(rows), len(columns), len(lanes))


def _tile_load_py(array, index, row_step, rows, columns, lanes):
    size = len(columns) * len(lanes)
    return np.stack([array[index + r * row_step:index + r * row_step + size] for r in range(len(rows))]).reshape(
        len(rows), len(columns), len(lanes))


def _tile_load_masked_py(array, mask, index, row_step, rows, columns, lanes):
    tile = _tile_load_py(array, index, row_step, rows, columns, lanes)
    return np.where(_relu_off_py(_tile_load_py(mask, index, row_step, rows, columns, lanes)), 0, tile).astype(
        array.dtype)


def _tile_store_py(array, index, row_step, tile):
    for r, row in enumerate(tile):
        array[index + r * row_step:index + r * row_step + row.size] = row.reshape(-1)


def _tile_outer_fma_py(tile, vectors, array, index, step):
    return tile + array[index + step * np.arange(len(tile))][:, None, None] * vectors[0]


def _tile_gather_fma_py(tile, vectors, array, base, offsets, first):
    return tile + array[base + offsets[first:first + len(tile)]][:, None, None] * vectors[0]


def _tile_transpose_py(tile):
    return np.ascontiguousarray(tile[:, 0, :].T)[:, None, :]


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
    relu_off, relu_gated = _relu_off_py, _relu_gated_py
else:
    tile_splat, tile_load, tile_load_masked, tile_store, tile_outer_fma, tile_gather_fma, tile_transpose = (
        _tile_splat, _tile_load, _tile_load_masked, _tile_store, _tile_outer_fma, _tile_gather_fma, _tile_transpose)
    take_next, flush_subnormals, restore_fp = _take_next, _flush_subnormals, _restore_fp
    relu_off, relu_gated = _relu_off, _relu_gated
# relu_off(y): whether a ReLU whose output (or input) is y zeroes the gradient there: y <= 0, False for NaN
# relu_gated(value, y): value, or 0 where relu_off(y)
# tile_splat(array, i, rows, columns, lanes)[r][c] = array[i + r] in every lane
# tile_load(array, i, row_step, rows, columns, lanes)[r][c] = array[i + r*row_step + c*lanes :][:lanes]
# tile_load_masked(array, mask, ...): tile_load(array, ...) with zeros where relu_off(tile_load(mask, ...))
# tile_store(array, i, row_step, tile): the inverse of tile_load
# tile_outer_fma(tile, vectors, array, i, step)[r][c] = tile[r][c] + array[i + r*step] * vectors[0][c]
# tile_gather_fma(tile, vectors, array, i, offsets, f)[r][c] = tile[r][c] + array[i + offsets[f + r]] * vectors[0][c]
# tile_transpose(tile)[r][0][l] = tile[l][0][r], for a tile of lanes rows of one vector
# take_next(counter): counter[0], incremented atomically (the next task of a pass)
# add_one, load_acquire, set_one_and_load, ticks, pause: the pool's compiled waiting (no stand-ins: the pool
# has its own for the functions it compiles from them)
# flush_subnormals() / restore_fp(state): subnormals as zero on this thread, and back

