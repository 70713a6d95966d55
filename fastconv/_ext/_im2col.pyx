"""im2col and col2im in the book's layout, parallel over the images of a batch.

``col`` has one row per window, rows ordered (n, y, x), and one column per
window cell, columns ordered (c, ky, kx). Each image goes through the
transposed layout of ``_unfold.pxd`` (C*FH*FW, out_h*out_w) in a
thread-private buffer: unfolding there copies long runs of the image, and a
transpose, in cache, gives the book's rows.
"""
from libc.string cimport memset

from cython cimport floating

from fastconv._ext._parallel cimport fc_next_task, fc_task_fn, run_tasks
from fastconv._ext._unfold cimport fold_image, unfold_image


cdef struct _Job:
    const void *source   # x for im2col, col for col2im
    void *target
    void *scratch        # K * HW elements per thread
    Py_ssize_t N, C, H, W, filter_h, filter_w, stride, pad, out_h, out_w
    long next


def im2col(const floating[:, :, :, ::1] x, floating[:, ::1] col,
           Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
           Py_ssize_t out_h, Py_ssize_t out_w, floating[::1] scratch, int num_threads):
    """Fill ``col`` (N*out_h*out_w, C*filter_h*filter_w) with the windows of ``x``; out_h x out_w
    windows per image (the caller's output size).

    ``scratch`` holds C*filter_h*filter_w*out_h*out_w elements per thread.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = C * filter_h * filter_w, HW = out_h * out_w
    _check(filter_h, filter_w, stride, pad, out_h, out_w)
    if col.shape[0] != N * HW or col.shape[1] != K:
        raise ValueError("col has the wrong shape")
    if scratch.shape[0] < num_threads * K * HW:
        raise ValueError("scratch is too small")
    if col.size == 0:
        return
    cdef _Job job = _job(&x[0, 0, 0, 0], &col[0, 0], &scratch[0], N, C, H, W,
                         filter_h, filter_w, stride, pad, out_h, out_w)
    cdef fc_task_fn work = _im2col_float if floating is float else _im2col_double
    with nogil:
        run_tasks(num_threads, work, &job)


def col2im(const floating[:, ::1] col, floating[:, :, :, ::1] x,
           Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
           Py_ssize_t out_h, Py_ssize_t out_w, floating[::1] scratch, int num_threads):
    """Overwrite ``x`` with the sum of the windows in ``col`` (out_h x out_w per image) put back where
    they came from."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = C * filter_h * filter_w, HW = out_h * out_w
    _check(filter_h, filter_w, stride, pad, out_h, out_w)
    if col.shape[0] != N * HW or col.shape[1] != K:
        raise ValueError("col has the wrong shape")
    if scratch.shape[0] < num_threads * K * HW:
        raise ValueError("scratch is too small")
    if x.size == 0:
        return
    cdef _Job job = _job(&col[0, 0], &x[0, 0, 0, 0], &scratch[0], N, C, H, W,
                         filter_h, filter_w, stride, pad, out_h, out_w)
    cdef fc_task_fn work = _col2im_float if floating is float else _col2im_double
    with nogil:
        run_tasks(num_threads, work, &job)


cdef void _check(Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad, Py_ssize_t out_h,
                 Py_ssize_t out_w) except *:
    # any number of windows is safe to unfold (cells outside the image are padding), but not a negative one
    if filter_h < 1 or filter_w < 1 or stride < 1 or pad < 0 or out_h < 0 or out_w < 0:
        raise ValueError("filter sizes and stride must be >= 1, pad and output sizes >= 0")


cdef _Job _job(const void *source, void *target, void *scratch, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H,
               Py_ssize_t W, Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
               Py_ssize_t out_h, Py_ssize_t out_w):
    cdef _Job job
    job.source, job.target, job.scratch = source, target, scratch
    job.N, job.C, job.H, job.W = N, C, H, W
    job.filter_h, job.filter_w, job.stride, job.pad, job.out_h, job.out_w = filter_h, filter_w, stride, pad, out_h, out_w
    job.next = 0
    return job


cdef void _im2col_images(floating *kind, _Job *job, int thread) noexcept nogil:
    cdef Py_ssize_t C = job.C, H = job.H, W = job.W, HW = job.out_h * job.out_w
    cdef Py_ssize_t K = C * job.filter_h * job.filter_w, n
    cdef const floating *x = <const floating *>job.source
    cdef floating *col = <floating *>job.target
    cdef floating *colT = <floating *>job.scratch + thread * K * HW
    while True:
        n = fc_next_task(&job.next)
        if n >= job.N:
            break
        unfold_image(x + n * C * H * W, colT, HW, C, H, W, job.filter_h, job.filter_w, job.stride, job.pad,
                     job.out_h, job.out_w, 0, job.out_h)
        _transpose(colT, K, HW, col + n * HW * K)


cdef void _col2im_images(floating *kind, _Job *job, int thread) noexcept nogil:
    cdef Py_ssize_t C = job.C, H = job.H, W = job.W, HW = job.out_h * job.out_w
    cdef Py_ssize_t K = C * job.filter_h * job.filter_w, n
    cdef const floating *col = <const floating *>job.source
    cdef floating *x = <floating *>job.target
    cdef floating *colT = <floating *>job.scratch + thread * K * HW
    while True:
        n = fc_next_task(&job.next)
        if n >= job.N:
            break
        _transpose(col + n * HW * K, HW, K, colT)
        memset(x + n * C * H * W, 0, C * H * W * sizeof(floating))
        fold_image(colT, HW, x + n * C * H * W, C, H, W, job.filter_h, job.filter_w, job.stride, job.pad,
                   job.out_h, job.out_w, 0, job.out_h)


cdef void _im2col_float(void *job, int thread) noexcept nogil:
    _im2col_images(<float *>NULL, <_Job *>job, thread)


cdef void _im2col_double(void *job, int thread) noexcept nogil:
    _im2col_images(<double *>NULL, <_Job *>job, thread)


cdef void _col2im_float(void *job, int thread) noexcept nogil:
    _col2im_images(<float *>NULL, <_Job *>job, thread)


cdef void _col2im_double(void *job, int thread) noexcept nogil:
    _col2im_images(<double *>NULL, <_Job *>job, thread)


cdef void _transpose(const floating *source, Py_ssize_t rows, Py_ssize_t cols, floating *target) noexcept nogil:
    """target (cols, rows) = source (rows, cols).T, both C-contiguous.

    Target is written in order; the source is read down its columns, which
    for an image's buffer (a few hundred KB at most) stays in cache.
    """
    cdef Py_ssize_t i, j
    for j in range(cols):
        for i in range(rows):
            target[j * rows + i] = source[i * cols + j]
