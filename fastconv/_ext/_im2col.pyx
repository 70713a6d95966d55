"""im2col and col2im in the book's layout, parallel over the images of a batch.

``col`` has one row per window, rows ordered (n, y, x), and one column per
window cell, columns ordered (c, ky, kx). Each image goes through the
transposed layout of ``_unfold.pxd`` (C*FH*FW, out_h*out_w) in a
thread-private buffer: unfolding there copies long runs of the image, and a
transpose, in cache, gives the book's rows.
"""
from cython.parallel cimport parallel, prange, threadid
from libc.string cimport memset

from cython cimport floating

from fastconv._ext._unfold cimport fold_image, unfold_image


def im2col(const floating[:, :, :, ::1] x, floating[:, ::1] col,
           Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
           floating[::1] scratch, int num_threads):
    """Fill ``col`` (N*out_h*out_w, C*filter_h*filter_w) with the windows of ``x``.

    ``scratch`` holds C*filter_h*filter_w*out_h*out_w elements per thread.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t out_h = (H + 2 * pad - filter_h) // stride + 1
    cdef Py_ssize_t out_w = (W + 2 * pad - filter_w) // stride + 1
    cdef Py_ssize_t K = C * filter_h * filter_w, HW = out_h * out_w
    if col.shape[0] != N * HW or col.shape[1] != K:
        raise ValueError("col has the wrong shape")
    if scratch.shape[0] < num_threads * K * HW:
        raise ValueError("scratch is too small")
    cdef const floating *xp = &x[0, 0, 0, 0]
    cdef floating *colp = &col[0, 0]
    cdef floating *scratchp = &scratch[0]
    cdef floating *colT = NULL
    cdef Py_ssize_t n
    with nogil, parallel(num_threads=num_threads):
        colT = scratchp + threadid() * K * HW
        for n in prange(N, schedule="dynamic"):
            unfold_image(xp + n * C * H * W, colT, HW, C, H, W, filter_h, filter_w, stride, pad, out_h, out_w, 0, out_h)
            _transpose(colT, K, HW, colp + n * HW * K)


def col2im(const floating[:, ::1] col, floating[:, :, :, ::1] x,
           Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
           floating[::1] scratch, int num_threads):
    """Overwrite ``x`` with the sum of the windows in ``col`` put back where they came from."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t out_h = (H + 2 * pad - filter_h) // stride + 1
    cdef Py_ssize_t out_w = (W + 2 * pad - filter_w) // stride + 1
    cdef Py_ssize_t K = C * filter_h * filter_w, HW = out_h * out_w
    if col.shape[0] != N * HW or col.shape[1] != K:
        raise ValueError("col has the wrong shape")
    if scratch.shape[0] < num_threads * K * HW:
        raise ValueError("scratch is too small")
    cdef const floating *colp = &col[0, 0]
    cdef floating *xp = &x[0, 0, 0, 0]
    cdef floating *scratchp = &scratch[0]
    cdef floating *colT = NULL
    cdef Py_ssize_t n
    with nogil, parallel(num_threads=num_threads):
        colT = scratchp + threadid() * K * HW
        for n in prange(N, schedule="dynamic"):
            _transpose(colp + n * HW * K, HW, K, colT)
            memset(xp + n * C * H * W, 0, C * H * W * sizeof(floating))
            fold_image(colT, HW, xp + n * C * H * W, C, H, W, filter_h, filter_w, stride, pad, out_h, out_w, 0, out_h)


cdef void _transpose(const floating *source, Py_ssize_t rows, Py_ssize_t cols, floating *target) noexcept nogil:
    """target (cols, rows) = source (rows, cols).T, both C-contiguous.

    Target is written in order; the source is read down its columns, which
    for an image's buffer (a few hundred KB at most) stays in cache.
    """
    cdef Py_ssize_t i, j
    for j in range(cols):
        for i in range(rows):
            target[j * rows + i] = source[i * cols + j]
