"""Convolution forward and backward: per-image im2col + BLAS GEMM, in NCHW.

Each image is unfolded into a thread-private buffer in the transposed layout
``colT`` (C*FH*FW, out_h*out_w), small enough to stay in cache, and then

    out[n]  = W2 @ colT + b           (FN, out_h*out_w): already NCHW
    dW2    += dout[n] @ colT.T        (FN, C*FH*FW)
    dcolT   = W2.T @ dout[n]          folded back into dx[n]

with W2 = W.reshape(FN, C*FH*FW). Nothing of the size of the book's ``col``
is stored between forward and backward: backward unfolds the input again,
which is cheaper than writing and re-reading a batch-sized matrix.

The GEMMs are the BLAS that SciPy exposes to Cython (``scipy.linalg.cython_blas``),
called from inside the OpenMP region, one call per image; the caller makes
sure that BLAS runs single-threaded meanwhile, so that one thread pool is busy
at a time.

Backward splits the batch into a fixed number of groups of consecutive images,
sums dW and db per group and then adds the groups in order: the result does
not depend on the number of threads, bit for bit.
"""
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from cython.parallel cimport parallel, prange, threadid
from libc.string cimport memcpy, memset

from cython cimport floating

from fastconv._ext._window cimport end_inside, first_inside

ctypedef void (*sgemm_fn)(char *transa, char *transb, int *m, int *n, int *k,
                          float *alpha, float *a, int *lda, float *b, int *ldb,
                          float *beta, float *c, int *ldc) noexcept nogil
ctypedef void (*dgemm_fn)(char *transa, char *transb, int *m, int *n, int *k,
                          double *alpha, double *a, int *lda, double *b, int *ldb,
                          double *beta, double *c, int *ldc) noexcept nogil

cdef sgemm_fn _sgemm = NULL
cdef dgemm_fn _dgemm = NULL


cdef void *_capsule_pointer(object capsule) except NULL:
    return PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule))


def _bind_blas():
    """Take the GEMM function pointers from SciPy; no build-time dependency on SciPy."""
    global _sgemm, _dgemm
    from scipy.linalg.cython_blas import __pyx_capi__ as blas_api
    _sgemm = <sgemm_fn>_capsule_pointer(blas_api["sgemm"])
    _dgemm = <dgemm_fn>_capsule_pointer(blas_api["dgemm"])


_bind_blas()


cdef inline void _gemm(char transa, char transb, int m, int n, int k,
                       const floating *a, int lda, const floating *b, int ldb,
                       floating beta, floating *c, int ldc) noexcept nogil:
    """Column-major C = op(A) @ op(B) + beta * C (alpha = 1)."""
    cdef floating alpha = 1
    if floating is float:
        _sgemm(&transa, &transb, &m, &n, &k, &alpha, <float *>a, &lda, <float *>b, &ldb, &beta, c, &ldc)
    else:
        _dgemm(&transa, &transb, &m, &n, &k, &alpha, <double *>a, &lda, <double *>b, &ldb, &beta, c, &ldc)


cdef inline bint _is_identity_unfold(Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad) noexcept nogil:
    """A 1x1 kernel with stride 1 and no pad: colT of an image is the image itself."""
    return fh == 1 and fw == 1 and stride == 1 and pad == 0


def conv_forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w2, const floating[::1] b,
                 floating[:, :, ::1] out, floating[::1] scratch,
                 Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
                 int num_threads):
    """out (N, FN, out_h*out_w) = convolution of x with W2 (FN, C*FH*FW), plus b."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t FN = w2.shape[0], K = w2.shape[1]
    cdef Py_ssize_t out_h = (H + 2 * pad - filter_h) // stride + 1
    cdef Py_ssize_t out_w = (W + 2 * pad - filter_w) // stride + 1
    cdef Py_ssize_t HW = out_h * out_w
    if K != C * filter_h * filter_w or b.shape[0] != FN:
        raise ValueError("W2 or b does not match x and the filter size")
    if out.shape[0] != N or out.shape[1] != FN or out.shape[2] != HW:
        raise ValueError("out has the wrong shape")
    if scratch.shape[0] < num_threads * K * HW:
        raise ValueError("scratch is too small")
    cdef bint identity = _is_identity_unfold(filter_h, filter_w, stride, pad)
    cdef const floating *xp = &x[0, 0, 0, 0]
    cdef const floating *wp = &w2[0, 0]
    cdef const floating *bp = &b[0]
    cdef floating *outp = &out[0, 0, 0]
    cdef floating *scratchp = &scratch[0] if scratch.shape[0] > 0 else NULL
    cdef floating *colT = NULL
    cdef const floating *image_col
    cdef floating *image_out
    cdef Py_ssize_t n, f, i
    with nogil, parallel(num_threads=num_threads):
        colT = scratchp + threadid() * K * HW
        for n in prange(N, schedule="static"):
            if identity:
                image_col = xp + n * C * H * W
            else:
                _unfold_image_t(xp + n * C * H * W, colT, C, H, W, filter_h, filter_w, stride, pad, out_h, out_w)
                image_col = colT
            image_out = outp + n * FN * HW
            for f in range(FN):
                for i in range(HW):
                    image_out[f * HW + i] = bp[f]
            # row-major (FN, HW) = W2 @ colT, written as column-major (HW, FN) = colT.T @ W2.T
            _gemm(c'N', c'N', <int>HW, <int>FN, <int>K, image_col, <int>HW, wp, <int>K, 1, image_out, <int>HW)


def conv_backward(const floating[:, :, :, ::1] x, const floating[:, ::1] w2, const floating[:, :, ::1] dout,
                  floating[:, :, :, ::1] dx, floating[:, ::1] dw2, floating[::1] db,
                  floating[:, ::1] dw_groups, double[:, ::1] db_groups, floating[::1] scratch,
                  Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
                  int num_threads):
    """Fill dx (N, C, H, W), dw2 (FN, C*FH*FW) and db (FN,) from dout (N, FN, out_h*out_w).

    ``dw_groups`` (G, FN*C*FH*FW) and ``db_groups`` (G, FN) hold the sums of
    each of the G groups of images; G sets the order of summation.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t FN = w2.shape[0], K = w2.shape[1]
    cdef Py_ssize_t out_h = (H + 2 * pad - filter_h) // stride + 1
    cdef Py_ssize_t out_w = (W + 2 * pad - filter_w) // stride + 1
    cdef Py_ssize_t HW = out_h * out_w
    cdef Py_ssize_t G = dw_groups.shape[0]
    if K != C * filter_h * filter_w:
        raise ValueError("W2 does not match x and the filter size")
    if dout.shape[0] != N or dout.shape[1] != FN or dout.shape[2] != HW:
        raise ValueError("dout has the wrong shape")
    if (dx.shape[0] != N or dx.shape[1] != C or dx.shape[2] != H or dx.shape[3] != W
            or dw2.shape[0] != FN or dw2.shape[1] != K or db.shape[0] != FN):
        raise ValueError("dx, dw2 or db has the wrong shape")
    if G < 1 or G > N or dw_groups.shape[1] != FN * K or db_groups.shape[0] != G or db_groups.shape[1] != FN:
        raise ValueError("dw_groups or db_groups has the wrong shape")
    if scratch.shape[0] < 2 * num_threads * K * HW:
        raise ValueError("scratch is too small")
    cdef bint identity = _is_identity_unfold(filter_h, filter_w, stride, pad)
    cdef const floating *xp = &x[0, 0, 0, 0]
    cdef const floating *wp = &w2[0, 0]
    cdef const floating *doutp = &dout[0, 0, 0]
    cdef floating *dxp = &dx[0, 0, 0, 0]
    cdef floating *dwgp = &dw_groups[0, 0]
    cdef double *dbgp = &db_groups[0, 0]
    cdef floating *scratchp = &scratch[0] if scratch.shape[0] > 0 else NULL
    cdef floating *colT = NULL
    cdef floating *dcolT = NULL
    cdef const floating *image_col
    cdef floating *image_dcol
    cdef const floating *image_dout
    cdef floating beta
    cdef Py_ssize_t g, n, f, j
    cdef double total
    with nogil, parallel(num_threads=num_threads):
        colT = scratchp + threadid() * 2 * K * HW
        dcolT = colT + K * HW
        for g in prange(G, schedule="static"):
            for n in range(g * N // G, (g + 1) * N // G):
                image_dout = doutp + n * FN * HW
                beta = 0 if n == g * N // G else 1
                for f in range(FN):
                    total = _row_sum(image_dout + f * HW, HW)
                    if beta == 0:
                        dbgp[g * FN + f] = total
                    else:
                        dbgp[g * FN + f] += total
                if identity:
                    image_col = xp + n * C * H * W
                    image_dcol = dxp + n * C * H * W
                else:
                    _unfold_image_t(xp + n * C * H * W, colT, C, H, W, filter_h, filter_w, stride, pad, out_h, out_w)
                    image_col = colT
                    image_dcol = dcolT
                # row-major (FN, K) += dout[n] @ colT.T, i.e. column-major (K, FN) += colT @ dout[n].T
                _gemm(c'T', c'N', <int>K, <int>FN, <int>HW, image_col, <int>HW, image_dout, <int>HW,
                      beta, dwgp + g * FN * K, <int>K)
                # row-major (K, HW) = W2.T @ dout[n], i.e. column-major (HW, K) = dout[n].T @ W2
                _gemm(c'N', c'T', <int>HW, <int>K, <int>FN, image_dout, <int>HW, wp, <int>K,
                      0, image_dcol, <int>HW)
                if not identity:
                    memset(dxp + n * C * H * W, 0, C * H * W * sizeof(floating))
                    _fold_image_t(dcolT, dxp + n * C * H * W, C, H, W, filter_h, filter_w, stride, pad, out_h, out_w)
    cdef floating *dw2p = &dw2[0, 0]
    with nogil:
        memcpy(dw2p, dwgp, FN * K * sizeof(floating))
        for g in range(1, G):
            for j in range(FN * K):
                dw2p[j] += dwgp[g * FN * K + j]
        for f in range(FN):
            total = 0
            for g in range(G):
                total += db_groups[g, f]
            db[f] = <floating>total


cdef inline double _row_sum(const floating *values, Py_ssize_t count) noexcept nogil:
    """Sum in double, four independent partial sums (a fixed order, and fast)."""
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef Py_ssize_t i, end4 = count - count % 4
    for i in range(0, end4, 4):
        s0 += values[i]
        s1 += values[i + 1]
        s2 += values[i + 2]
        s3 += values[i + 3]
    for i in range(end4, count):
        s0 += values[i]
    return (s0 + s1) + (s2 + s3)


cdef void _unfold_image_t(const floating *x, floating *colT,
                          Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                          Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad,
                          Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    """colT (C*fh*fw, out_h*out_w) of one image: row (c, ky, kx) holds what that cell sees in every window."""
    cdef Py_ssize_t HW = out_h * out_w
    cdef Py_ssize_t c, ky, kx, oy, ox, oy_lo, oy_hi, ox_lo, ox_hi, src
    cdef floating *row
    cdef floating *line
    for ky in range(fh):
        oy_lo = first_inside(ky - pad, stride)
        oy_hi = end_inside(ky - pad, stride, H, out_h, oy_lo)
        for kx in range(fw):
            ox_lo = first_inside(kx - pad, stride)
            ox_hi = end_inside(kx - pad, stride, W, out_w, ox_lo)
            for c in range(C):
                row = colT + ((c * fh + ky) * fw + kx) * HW
                memset(row, 0, oy_lo * out_w * sizeof(floating))
                for oy in range(oy_lo, oy_hi):
                    line = row + oy * out_w
                    src = (c * H + oy * stride + ky - pad) * W + kx - pad
                    for ox in range(ox_lo):
                        line[ox] = 0
                    if stride == 1:
                        for ox in range(ox_lo, ox_hi):
                            line[ox] = x[src + ox]
                    else:
                        for ox in range(ox_lo, ox_hi):
                            line[ox] = x[src + ox * stride]
                    for ox in range(ox_hi, out_w):
                        line[ox] = 0
                memset(row + oy_hi * out_w, 0, (out_h - oy_hi) * out_w * sizeof(floating))


cdef void _fold_image_t(const floating *colT, floating *x,
                        Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                        Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad,
                        Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    """Add every row of colT back onto the image cells it was taken from (the adjoint of unfolding)."""
    cdef Py_ssize_t HW = out_h * out_w
    cdef Py_ssize_t c, ky, kx, oy, ox, oy_lo, oy_hi, ox_lo, ox_hi, dst
    cdef const floating *row
    cdef const floating *line
    for c in range(C):
        for ky in range(fh):
            oy_lo = first_inside(ky - pad, stride)
            oy_hi = end_inside(ky - pad, stride, H, out_h, oy_lo)
            for kx in range(fw):
                ox_lo = first_inside(kx - pad, stride)
                ox_hi = end_inside(kx - pad, stride, W, out_w, ox_lo)
                row = colT + ((c * fh + ky) * fw + kx) * HW
                for oy in range(oy_lo, oy_hi):
                    line = row + oy * out_w
                    dst = (c * H + oy * stride + ky - pad) * W + kx - pad
                    if stride == 1:
                        for ox in range(ox_lo, ox_hi):
                            x[dst + ox] += line[ox]
                    else:
                        for ox in range(ox_lo, ox_hi):
                            x[dst + ox * stride] += line[ox]
