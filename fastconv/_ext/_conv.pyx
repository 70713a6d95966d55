"""Convolution forward and backward in NCHW: im2col and BLAS GEMM, a block of images at a time.

A block (one image, or several small ones: the caller picks its size) is
unfolded into a thread-private buffer in the transposed layout
``colT`` (C*FH*FW, block*out_h*out_w), small enough to stay in cache, and

    out    = W2 @ colT + b    (FN, block*out_h*out_w), each image's part copied to NCHW
    dW2   += dout @ colT.T    dout: the block's (FN, out_h*out_w) gradients side by side
    dcolT  = W2.T @ dout      folded back into dx

with W2 = W.reshape(FN, C*FH*FW). Nothing of the size of the book's ``col``
is kept between forward and backward: backward unfolds the input again,
which costs less than writing and re-reading a batch-sized matrix.

The GEMMs are the BLAS that SciPy exposes to Cython (``scipy.linalg.cython_blas``),
called by every thread of the pool (``_parallel``); the caller keeps that BLAS
single-threaded meanwhile, so that one thread pool is busy at a time.

Backward splits the batch into a fixed number of groups of consecutive
images, sums dW and db per group, in order, and then adds the groups in
order: the result does not depend on the number of threads, bit for bit.
Threads take blocks and groups dynamically, so one that the OS delays does
not hold up a fixed share of the work.
"""
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from libc.string cimport memcpy, memset

from cython cimport floating

from fastconv._ext._parallel cimport fc_next_task, fc_task_fn, run_tasks
from fastconv._ext._unfold cimport fold_image, unfold_image


cdef struct _Job:
    const void *x
    const void *w2
    const void *b
    const void *dout
    void *out
    void *dx
    void *dw_groups
    double *db_groups
    void *scratch
    Py_ssize_t N, C, H, W, FN, K, filter_h, filter_w, stride, pad, out_h, out_w
    Py_ssize_t block, tile_lines, per_thread, groups
    long next

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


cpdef Py_ssize_t scratch_per_thread(Py_ssize_t K, Py_ssize_t FN, Py_ssize_t block, Py_ssize_t out_hw) noexcept nogil:
    """Scratch elements one thread needs: colT and dcolT (K, block*out_hw), dout gathered (FN, block*out_hw)."""
    return (2 * K + FN) * block * out_hw


def conv_forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w2, const floating[::1] b,
                 floating[:, :, ::1] out, floating[::1] scratch,
                 Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
                 Py_ssize_t out_h, Py_ssize_t out_w, Py_ssize_t block, Py_ssize_t tile_lines, int num_threads):
    """out (N, FN, out_h*out_w) = convolution of x with W2 (FN, C*FH*FW), plus b; out_h x out_w is the
    caller's output size.

    Work comes in pieces: ``block`` images, or (with block = 1) ``tile_lines``
    output lines of one image.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t FN = w2.shape[0], K = w2.shape[1]
    cdef Py_ssize_t HW = out_h * out_w
    cdef Py_ssize_t per_thread = scratch_per_thread(K, FN, block, HW)
    _check_geometry(filter_h, filter_w, stride, pad, out_h, out_w)
    if K != C * filter_h * filter_w or b.shape[0] != FN:
        raise ValueError("W2 or b does not match x and the filter size")
    if out.shape[0] != N or out.shape[1] != FN or out.shape[2] != HW:
        raise ValueError("out has the wrong shape")
    if block < 1 or scratch.shape[0] < num_threads * per_thread:
        raise ValueError("block must be >= 1 and scratch large enough for it")
    if tile_lines < 1 or (block > 1 and tile_lines < out_h):
        raise ValueError("tile_lines must be >= 1, and cover the image when a block has several")
    cdef _Job job
    _fill(&job, &x[0, 0, 0, 0], &w2[0, 0], N, C, H, W, FN, K, filter_h, filter_w, stride, pad, out_h, out_w,
          block, tile_lines, per_thread, &scratch[0])
    job.b, job.out = &b[0], &out[0, 0, 0]
    cdef fc_task_fn work = _forward_float if floating is float else _forward_double
    with nogil:
        run_tasks(num_threads, work, &job)


cdef void _check_geometry(Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
                          Py_ssize_t out_h, Py_ssize_t out_w) except *:
    # any number of windows is safe to unfold (cells outside the image are padding), but not a negative one
    if filter_h < 1 or filter_w < 1 or stride < 1 or pad < 0 or out_h < 1 or out_w < 1:
        raise ValueError("filter sizes, stride and output sizes must be >= 1, pad >= 0")


cdef void _fill(_Job *job, const void *x, const void *w2, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                Py_ssize_t FN, Py_ssize_t K, Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride,
                Py_ssize_t pad, Py_ssize_t out_h, Py_ssize_t out_w, Py_ssize_t block, Py_ssize_t tile_lines,
                Py_ssize_t per_thread, void *scratch) noexcept:
    job.x, job.w2, job.scratch = x, w2, scratch
    job.N, job.C, job.H, job.W, job.FN, job.K = N, C, H, W, FN, K
    job.filter_h, job.filter_w, job.stride, job.pad, job.out_h, job.out_w = filter_h, filter_w, stride, pad, out_h, out_w
    job.block, job.tile_lines, job.per_thread, job.next = block, tile_lines, per_thread, 0


cdef void _forward_pieces(floating *kind, _Job *job, int thread) noexcept nogil:
    cdef Py_ssize_t N = job.N, C = job.C, H = job.H, W = job.W, FN = job.FN, K = job.K
    cdef Py_ssize_t out_h = job.out_h, out_w = job.out_w, HW = out_h * out_w
    cdef Py_ssize_t block = job.block, tile_lines = job.tile_lines
    cdef Py_ssize_t tiles = (out_h + tile_lines - 1) // tile_lines
    cdef Py_ssize_t pieces = ((N + block - 1) // block) * tiles
    cdef const floating *xp = <const floating *>job.x
    cdef const floating *wp = <const floating *>job.w2
    cdef const floating *bp = <const floating *>job.b
    cdef floating *outp = <floating *>job.out
    cdef floating *colT = <floating *>job.scratch + thread * job.per_thread
    cdef floating *product = colT + K * block * HW
    cdef const floating *source
    cdef floating *target
    cdef floating bias
    cdef Py_ssize_t piece, first, count, oy0, oy1, part, columns, j, f, i
    while True:
        piece = fc_next_task(&job.next)
        if piece >= pieces:
            break
        first = (piece // tiles) * block
        count = min(block, N - first)
        oy0 = (piece % tiles) * tile_lines
        oy1 = min(oy0 + tile_lines, out_h)
        part = (oy1 - oy0) * out_w  # columns of one image
        columns = count * part
        for j in range(count):
            unfold_image(xp + (first + j) * C * H * W, colT + j * part, columns,
                         C, H, W, job.filter_h, job.filter_w, job.stride, job.pad, out_h, out_w, oy0, oy1)
        # row-major (FN, columns) = W2 @ colT, as column-major (columns, FN) = colT.T @ W2.T
        _gemm(c'N', c'N', <int>columns, <int>FN, <int>K, colT, <int>columns, wp, <int>K,
              0, product, <int>columns)
        for j in range(count):
            for f in range(FN):
                source = product + f * columns + j * part
                target = outp + ((first + j) * FN + f) * HW + oy0 * out_w
                bias = bp[f]
                for i in range(part):
                    target[i] = source[i] + bias


cdef void _forward_float(void *job, int thread) noexcept nogil:
    _forward_pieces(<float *>NULL, <_Job *>job, thread)


cdef void _forward_double(void *job, int thread) noexcept nogil:
    _forward_pieces(<double *>NULL, <_Job *>job, thread)


def conv_backward(const floating[:, :, :, ::1] x, const floating[:, ::1] w2, const floating[:, :, ::1] dout,
                  floating[:, :, :, ::1] dx, floating[:, ::1] dw2, floating[::1] db,
                  floating[:, ::1] dw_groups, double[:, ::1] db_groups, floating[::1] scratch,
                  Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
                  Py_ssize_t out_h, Py_ssize_t out_w, Py_ssize_t block, Py_ssize_t tile_lines, int num_threads):
    """Fill dx (N, C, H, W), dw2 (FN, C*FH*FW) and db (FN,) from dout (N, FN, out_h*out_w).

    ``dw_groups`` (G, C*FH*FW*FN: dW transposed) and ``db_groups`` (G, FN) hold the sums of
    each of the G groups of images; G sets the order of summation. Pieces of
    work as in ``conv_forward``.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t FN = w2.shape[0], K = w2.shape[1]
    cdef Py_ssize_t HW = out_h * out_w
    cdef Py_ssize_t G = dw_groups.shape[0]
    cdef Py_ssize_t per_thread = scratch_per_thread(K, FN, block, HW)
    _check_geometry(filter_h, filter_w, stride, pad, out_h, out_w)
    if K != C * filter_h * filter_w:
        raise ValueError("W2 does not match x and the filter size")
    if dout.shape[0] != N or dout.shape[1] != FN or dout.shape[2] != HW:
        raise ValueError("dout has the wrong shape")
    if (dx.shape[0] != N or dx.shape[1] != C or dx.shape[2] != H or dx.shape[3] != W
            or dw2.shape[0] != FN or dw2.shape[1] != K or db.shape[0] != FN):
        raise ValueError("dx, dw2 or db has the wrong shape")
    if G < 1 or G > N or dw_groups.shape[1] != FN * K or db_groups.shape[0] != G or db_groups.shape[1] != FN:
        raise ValueError("dw_groups or db_groups has the wrong shape")
    if block < 1 or scratch.shape[0] < num_threads * per_thread:
        raise ValueError("block must be >= 1 and scratch large enough for it")
    if tile_lines < 1 or (block > 1 and tile_lines < out_h):
        raise ValueError("tile_lines must be >= 1, and cover the image when a block has several")
    cdef _Job job
    _fill(&job, &x[0, 0, 0, 0], &w2[0, 0], N, C, H, W, FN, K, filter_h, filter_w, stride, pad, out_h, out_w,
          block, tile_lines, per_thread, &scratch[0])
    job.dout, job.dx, job.groups = <void *>&dout[0, 0, 0], &dx[0, 0, 0, 0], G
    job.dw_groups, job.db_groups = &dw_groups[0, 0], &db_groups[0, 0]
    cdef fc_task_fn work = _backward_float if floating is float else _backward_double
    with nogil:
        run_tasks(num_threads, work, &job)
    cdef floating *dwgp = &dw_groups[0, 0]
    cdef Py_ssize_t j, f, g
    cdef double total
    cdef floating *dw2p = &dw2[0, 0]
    cdef floating dw_sum
    with nogil:
        for j in range(K):  # the groups' (K, FN) sums, in group order, into dw2 (FN, K)
            for f in range(FN):
                dw_sum = dwgp[j * FN + f]
                for g in range(1, G):
                    dw_sum = dw_sum + dwgp[g * FN * K + j * FN + f]
                dw2p[f * K + j] = dw_sum
        for f in range(FN):
            total = 0
            for g in range(G):
                total += db_groups[g, f]
            db[f] = <floating>total


cdef void _backward_groups(floating *kind, _Job *job, int thread) noexcept nogil:
    cdef Py_ssize_t N = job.N, C = job.C, H = job.H, W = job.W, FN = job.FN, K = job.K, G = job.groups
    cdef Py_ssize_t out_h = job.out_h, out_w = job.out_w, HW = out_h * out_w
    cdef Py_ssize_t block = job.block, tile_lines = job.tile_lines
    cdef const floating *xp = <const floating *>job.x
    cdef const floating *wp = <const floating *>job.w2
    cdef const floating *doutp = <const floating *>job.dout
    cdef floating *dxp = <floating *>job.dx
    cdef floating *dwgp = <floating *>job.dw_groups
    cdef double *dbgp = job.db_groups
    cdef floating *colT = <floating *>job.scratch + thread * job.per_thread
    cdef floating *dcolT = colT + K * block * HW
    cdef floating *gathered = dcolT + K * block * HW
    cdef const floating *block_dout
    cdef floating beta
    cdef Py_ssize_t g, first, end, count, oy0, oy1, part, columns, dout_ld, n, j, f
    cdef double total
    while True:
        g = fc_next_task(&job.next)
        if g >= G:
            break
        end = (g + 1) * N // G
        first = g * N // G
        beta = 0  # the group's first product overwrites its sums
        while first < end:
            count = min(block, end - first)
            for f in range(FN):
                total = 0
                for n in range(first, first + count):
                    total = total + _row_sum(doutp + (n * FN + f) * HW, HW)
                dbgp[g * FN + f] = total if beta == 0 else dbgp[g * FN + f] + total
            for j in range(count):
                memset(dxp + (first + j) * C * H * W, 0, C * H * W * sizeof(floating))
            oy0 = 0
            while oy0 < out_h:
                oy1 = min(oy0 + tile_lines, out_h)
                part = (oy1 - oy0) * out_w
                columns = count * part
                if count == 1:  # the image's (FN, HW) gradients, lines [oy0, oy1)
                    block_dout = doutp + first * FN * HW + oy0 * out_w
                    dout_ld = HW
                else:  # the images' (FN, HW) blocks side by side: (FN, count*HW)
                    for f in range(FN):
                        for j in range(count):
                            memcpy(gathered + f * columns + j * HW, doutp + ((first + j) * FN + f) * HW,
                                   HW * sizeof(floating))
                    block_dout = gathered
                    dout_ld = columns
                for j in range(count):
                    unfold_image(xp + (first + j) * C * H * W, colT + j * part, columns,
                                 C, H, W, job.filter_h, job.filter_w, job.stride, job.pad, out_h, out_w, oy0, oy1)
                # the group's dW transposed: row-major (K, FN) += colT @ dout.T, as column-major
                # (FN, K) += dout @ colT.T; in float32 this order is the faster product (about 1.7
                # times on the second layer's shapes), in float64 as fast
                _gemm(c'T', c'N', <int>FN, <int>K, <int>columns, block_dout, <int>dout_ld, colT, <int>columns,
                      beta, dwgp + g * FN * K, <int>FN)
                beta = 1
                # row-major (K, columns) = W2.T @ dout, as column-major (columns, K) = dout.T @ W2
                _gemm(c'N', c'T', <int>columns, <int>K, <int>FN, block_dout, <int>dout_ld, wp, <int>K,
                      0, dcolT, <int>columns)
                for j in range(count):
                    fold_image(dcolT + j * part, columns, dxp + (first + j) * C * H * W,
                               C, H, W, job.filter_h, job.filter_w, job.stride, job.pad, out_h, out_w, oy0, oy1)
                oy0 = oy1
            first = first + count


cdef void _backward_float(void *job, int thread) noexcept nogil:
    _backward_groups(<float *>NULL, <_Job *>job, thread)


cdef void _backward_double(void *job, int thread) noexcept nogil:
    _backward_groups(<double *>NULL, <_Job *>job, thread)


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
