"""Jitted convolution loops of the numba backend: unfold, multiply, fold, piece after piece.

One call works through a sequence of pieces, each images [n0, n1) and
output lines [oy0, oy1) (all lines when n1 - n0 > 1): it unfolds a piece
into ``col`` (the ``colT`` layout of ``_numba_kernels``), multiplies it with
the filters by calling SciPy's BLAS directly, and goes on to the next piece,
with no Python and no GIL in between. Pieces are sized so that ``col`` is
still in the CPU cache when the product reads it.

The products are Fortran GEMMs on C-ordered buffers: a C-ordered (r, c)
block with row stride ld is, to BLAS, a column-major (c, r) matrix with
leading dimension ld, i.e. the transpose. Every call below is written in
those terms. With ``NUMBA_DISABLE_JIT=1`` (measuring coverage) the same
calls go to NumPy instead, since BLAS cannot be called from plain Python.
"""
import numpy as np
from numba import config, types
from numba import uint64 as _ix

try:
    import llvmlite.binding as _llvm
    from numba.extending import get_cython_function_address
    _GEMM_ADDRESSES = {name: get_cython_function_address("scipy.linalg.cython_blas", name)
                       for name in ("dgemm", "sgemm")}
except ImportError as exc:  # the numba backend is reported unavailable with this reason
    raise ImportError(f"the numba backend needs SciPy for its BLAS (pip install scipy): {exc}") from exc

from fastconv.backends._numba_kernels import (_inlined, _kernel, add_bias_to_nchw, col2im_t, col2im_t_padded,
                                              im2col_t_padded, im2col_t_same_size, nchw_to_rows, row_sum)

# Compiled code calls the BLAS by symbol name, bound to its address in each
# process, so that it can be cached on disk (a baked-in address could not).
for _name, _address in _GEMM_ADDRESSES.items():
    _llvm.add_symbol("fastconv_" + _name, _address)
_GEMM_SIGNATURE = types.void(*([types.voidptr] * 13))
_dgemm = types.ExternalFunction("fastconv_dgemm", _GEMM_SIGNATURE)
_sgemm = types.ExternalFunction("fastconv_sgemm", _GEMM_SIGNATURE)

N, T = ord("N"), ord("T")  # BLAS's "as is" and "transposed"


def _blas_gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc):
    """c = op(a) @ op(b) + beta * c on column-major matrices whose first elements start a, b, c."""
    ints = np.empty(8, dtype=np.int32)  # BLAS takes every argument by address
    ints[0] = m
    ints[1] = n
    ints[2] = k
    ints[3] = lda
    ints[4] = ldb
    ints[5] = ldc
    ints[6] = trans_a
    ints[7] = trans_b
    scalars = np.empty(2, dtype=c.dtype)
    scalars[0] = 1
    scalars[1] = beta
    if c.itemsize == 8:
        _dgemm(ints[6:].ctypes, ints[7:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes, scalars.ctypes,
               a.ctypes, ints[3:].ctypes, b.ctypes, ints[4:].ctypes, scalars[1:].ctypes, c.ctypes, ints[5:].ctypes)
    else:
        _sgemm(ints[6:].ctypes, ints[7:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes, scalars.ctypes,
               a.ctypes, ints[3:].ctypes, b.ctypes, ints[4:].ctypes, scalars[1:].ctypes, c.ctypes, ints[5:].ctypes)


def _column_major(flat, rows, cols, ld):
    return np.lib.stride_tricks.as_strided(flat, (rows, cols), (flat.itemsize, ld * flat.itemsize))


def _numpy_gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc):
    """``_blas_gemm`` for plain Python."""
    op_a = _column_major(a, k, m, lda).T if trans_a == T else _column_major(a, m, k, lda)
    op_b = _column_major(b, n, k, ldb).T if trans_b == T else _column_major(b, k, n, ldb)
    target = _column_major(c, m, n, ldc)
    target[...] = op_a @ op_b + (beta * target if beta else 0)


gemm = _numpy_gemm if config.DISABLE_JIT else _inlined(_blas_gemm)


@_inlined
def _unfold(x, fh, fw, stride, pad, col, n0, n1, oy0, oy1, plane, long_copies):
    if long_copies:
        im2col_t_same_size(x, fh, fw, pad, col, n0, n1, oy0, oy1)
    else:
        im2col_t_padded(x, fh, fw, stride, pad, col, n0, n1, oy0, oy1, plane)


@_inlined
def _fold(col, fh, fw, stride, pad, dx, n0, n1, oy0, oy1, plane, long_copies):
    if long_copies:
        col2im_t(col, fh, fw, stride, pad, dx, n0, n1, oy0, oy1)
    else:
        col2im_t_padded(col, fh, fw, stride, pad, dx, n0, n1, oy0, oy1, plane)


@_inlined
def _product_in_column_pieces(trans_b, width, n, k, a, lda, b, ldb, c, ldc, max_columns):
    """c = a @ op(b) (column-major: a is (width, k)) computed max_columns rows of c at a time."""
    pieces = (width + max_columns - 1) // max_columns
    for p in range(pieces):
        lo = width * p // pieces
        hi = width * (p + 1) // pieces
        gemm(N, trans_b, hi - lo, n, k, a[lo:], lda, b, ldb, 0.0, c[lo:], ldc)


@_kernel
def conv_forward_pieces(x, W_rows, b, out, pieces, p0, p1, fh, fw, stride, pad, long_copies, max_columns,
                        col, rows, plane):
    """out[n, :, lines] = W_rows @ (windows of the piece) + b, for pieces [p0, p1).

    ``out`` is (N, F, out_h*out_w); ``col``, ``rows`` and ``plane`` are flat
    scratch large enough for the widest piece. One image's product goes
    straight into its output lines; several images' go through ``rows``.
    """
    F, K = W_rows.shape
    hw = out.shape[2]
    out_w = (x.shape[3] + 2 * pad - fw) // stride + 1
    weights = W_rows.reshape(-1)
    flat_out = out.reshape(-1)
    for p in range(p0, p1):
        n0, n1, oy0, oy1 = pieces[p, 0], pieces[p, 1], pieces[p, 2], pieces[p, 3]
        width = (n1 - n0) * (oy1 - oy0) * out_w
        _unfold(x, fh, fw, stride, pad, col[:K * width].reshape((K, width)), n0, n1, oy0, oy1, plane, long_copies)
        if n1 - n0 == 1:
            first = n0 * F * hw + oy0 * out_w
            _product_in_column_pieces(N, width, F, K, col, width, weights, K, flat_out[first:], hw, max_columns)
            for f in range(F):
                start = first + f * hw
                for j in range(width):
                    flat_out[_ix(start + j)] += b[f]
        else:
            _product_in_column_pieces(N, width, F, K, col, width, weights, K, rows, width, max_columns)
            add_bias_to_nchw(rows[:F * width].reshape((F, width)), b, out, n0, n1)


@_kernel
def conv_backward_pieces(x, W_rows, dout, dx, dW_T, db, pieces, p0, p1, fh, fw, stride, pad, long_copies,
                         per_image_dw, max_columns, col, rows, dcol, plane):
    """dx of pieces [p0, p1), and their sums dW_T = windows @ dout.T (flat, K*F: dW transposed) and db
    (float64, F). The transposed order is the faster product in float32 (about 1.7 times on the
    second layer's shapes) and as fast in float64.

    The pieces of an image come in order, its first starting at line 0
    (folding zeroes the image there, then adds). With ``per_image_dw`` a
    piece of several images adds one product per image to dW_T: BLAS is slow
    on one long sum of tiny products.
    """
    F, K = W_rows.shape
    hw = dout.shape[2]
    out_w = (x.shape[3] + 2 * pad - fw) // stride + 1
    weights = W_rows.reshape(-1)
    flat_dout = dout.reshape(-1)
    beta = 0.0  # the first product starts the sum
    for p in range(p0, p1):
        n0, n1, oy0, oy1 = pieces[p, 0], pieces[p, 1], pieces[p, 2], pieces[p, 3]
        images = n1 - n0
        width = images * (oy1 - oy0) * out_w
        _unfold(x, fh, fw, stride, pad, col[:K * width].reshape((K, width)), n0, n1, oy0, oy1, plane, long_copies)
        if images == 1:  # the image's gradient lines are read where they are
            grad = flat_dout[n0 * F * hw + oy0 * out_w:]
            ld = hw
            for f in range(F):
                db[f] += row_sum(grad, f * hw, width)
        else:
            nchw_to_rows(dout, rows[:F * width].reshape((F, width)), db, n0, n1)
            grad = rows
            ld = width
        # dW_T (K, F) += col (K, width) @ grad.T (width, F)
        if per_image_dw and images > 1:
            cells = width // images
            for i in range(images):
                gemm(T, N, F, K, cells, grad[i * cells:], ld, col[i * cells:], width, beta, dW_T, F)
                beta = 1.0
        else:
            gemm(T, N, F, K, width, grad, ld, col, width, beta, dW_T, F)
            beta = 1.0
        # dcol (K, width) = W_rows.T @ grad, folded back into dx
        _product_in_column_pieces(T, width, K, F, grad, ld, weights, K, dcol, width, max_columns)
        _fold(dcol[:K * width].reshape((K, width)), fh, fw, stride, pad, dx, n0, n1, oy0, oy1, plane, long_copies)
