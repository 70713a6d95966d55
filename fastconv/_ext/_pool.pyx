"""Max pooling by direct loops over each (image, channel) plane, in NCHW.

Cells outside the image count as -inf: they take part in the comparison,
in their (ky, kx) place, but never beat a real value. The first maximum in
(ky, kx) order wins ties, and NaN counts as larger than any number, as in
``numpy.argmax``. For every output the forward pass stores where its maximum
came from: the flat index y * W + x inside the plane, or -1 when a padding
cell won (possible only when a window holds nothing but -inf), in which case
its gradient is dropped.
"""
from libc.math cimport INFINITY
from libc.string cimport memset

from cython cimport floating

from fastconv._ext._parallel cimport fc_next_task, fc_task_fn, run_tasks

cdef extern from "pool2x2.h":
    void fc_pool2x2_plane_float(const float *x, int H, int W, float *out, int *source, int out_h, int out_w) nogil
    void fc_pool2x2_plane_double(const double *x, int H, int W, double *out, int *source, int out_h,
                                 int out_w) nogil

cdef enum:
    # planes handed to a thread at a time
    PLANES_PER_TASK = 16

# the same, for the caller's count of tasks
TASK_PLANES = PLANES_PER_TASK


cdef struct _Job:
    const void *x
    void *out
    void *dout
    void *dx
    int *source
    Py_ssize_t planes, H, W, pool_h, pool_w, stride, pad, out_h, out_w
    long next


def maxpool_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out, int[::1] source,
                    Py_ssize_t pool_h, Py_ssize_t pool_w, Py_ssize_t stride, Py_ssize_t pad,
                    int num_threads):
    """Fill ``out`` (N, C, out_h, out_w: the caller's output size) and ``source`` (N*C*out_h*out_w,)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t out_h = out.shape[2], out_w = out.shape[3]
    if out.shape[0] != N or out.shape[1] != C:
        raise ValueError("out has the wrong shape")
    if pool_h < 1 or pool_w < 1 or stride < 1 or pad < 0:
        raise ValueError("pool sizes and stride must be >= 1, pad >= 0")
    # windows outside the image are compared exactly (as -inf), except by the 2 x 2 kernel, which reads
    # the cells of every window it is given
    if pool_h == 2 and pool_w == 2 and stride == 2 and pad == 0 and (2 * out_h > H or 2 * out_w > W):
        raise ValueError("out has more 2 x 2 windows than x holds")
    if source.shape[0] != N * C * out_h * out_w:
        raise ValueError("source has the wrong size")
    if N * C == 0 or out_h * out_w == 0:
        return
    cdef _Job job
    job.x, job.out, job.source, job.planes = &x[0, 0, 0, 0], &out[0, 0, 0, 0], &source[0], N * C
    job.H, job.W, job.pool_h, job.pool_w, job.stride, job.pad = H, W, pool_h, pool_w, stride, pad
    job.out_h, job.out_w, job.next = out_h, out_w, 0
    cdef fc_task_fn work = _forward_float if floating is float else _forward_double
    with nogil:
        run_tasks(num_threads, work, &job)


def maxpool_backward(const floating[:, :, :, ::1] dout, const int[::1] source, floating[:, :, :, ::1] dx,
                     int num_threads):
    """Overwrite ``dx`` (N, C, H, W) with each gradient of ``dout`` added at its window's maximum."""
    cdef Py_ssize_t N = dx.shape[0], C = dx.shape[1], H = dx.shape[2], W = dx.shape[3]
    cdef Py_ssize_t out_hw = dout.shape[2] * dout.shape[3]
    if dout.shape[0] != N or dout.shape[1] != C or source.shape[0] != N * C * out_hw:
        raise ValueError("dout, source and dx do not match")
    if N * C == 0 or H * W == 0:
        return
    cdef _Job job
    job.dout, job.source, job.dx, job.planes = <void *>&dout[0, 0, 0, 0], <int *>&source[0], &dx[0, 0, 0, 0], N * C
    job.H, job.W, job.out_h, job.out_w, job.next = H, W, dout.shape[2], dout.shape[3], 0
    cdef fc_task_fn work = _backward_float if floating is float else _backward_double
    with nogil:
        run_tasks(num_threads, work, &job)


cdef void _forward_planes(floating *kind, _Job *job) noexcept nogil:
    cdef const floating *x = <const floating *>job.x
    cdef floating *out = <floating *>job.out
    cdef Py_ssize_t out_hw = job.out_h * job.out_w, first, plane
    while True:
        first = fc_next_task(&job.next) * PLANES_PER_TASK
        if first >= job.planes:
            break
        for plane in range(first, min(first + PLANES_PER_TASK, job.planes)):
            if job.pool_h == 2 and job.pool_w == 2 and job.stride == 2 and job.pad == 0:
                if floating is float:
                    fc_pool2x2_plane_float(x + plane * job.H * job.W, job.H, job.W, out + plane * out_hw,
                                           job.source + plane * out_hw, job.out_h, job.out_w)
                else:
                    fc_pool2x2_plane_double(x + plane * job.H * job.W, job.H, job.W, out + plane * out_hw,
                                            job.source + plane * out_hw, job.out_h, job.out_w)
                continue
            _pool_plane(x + plane * job.H * job.W, out + plane * out_hw, job.source + plane * out_hw,
                        job.H, job.W, job.pool_h, job.pool_w, job.stride, job.pad, job.out_h, job.out_w)


cdef void _backward_planes(floating *kind, _Job *job) noexcept nogil:
    cdef const floating *dout = <const floating *>job.dout
    cdef floating *dx = <floating *>job.dx
    cdef floating *dx_plane
    cdef Py_ssize_t out_hw = job.out_h * job.out_w, first, plane, o
    cdef int cell
    while True:
        first = fc_next_task(&job.next) * PLANES_PER_TASK
        if first >= job.planes:
            break
        for plane in range(first, min(first + PLANES_PER_TASK, job.planes)):
            dx_plane = dx + plane * job.H * job.W
            memset(dx_plane, 0, job.H * job.W * sizeof(floating))
            for o in range(out_hw):
                cell = job.source[plane * out_hw + o]
                if cell >= 0:
                    dx_plane[cell] += dout[plane * out_hw + o]


cdef void _forward_float(void *job, int thread) noexcept nogil:
    _forward_planes(<float *>NULL, <_Job *>job)


cdef void _forward_double(void *job, int thread) noexcept nogil:
    _forward_planes(<double *>NULL, <_Job *>job)


cdef void _backward_float(void *job, int thread) noexcept nogil:
    _backward_planes(<float *>NULL, <_Job *>job)


cdef void _backward_double(void *job, int thread) noexcept nogil:
    _backward_planes(<double *>NULL, <_Job *>job)


cdef void _pool_plane(const floating *x, floating *out, int *source,
                      Py_ssize_t H, Py_ssize_t W, Py_ssize_t pool_h, Py_ssize_t pool_w,
                      Py_ssize_t stride, Py_ssize_t pad, Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    cdef Py_ssize_t oy, ox, top, left
    for oy in range(out_h):
        top = oy * stride - pad
        for ox in range(out_w):
            left = ox * stride - pad
            if top >= 0 and left >= 0 and top + pool_h <= H and left + pool_w <= W:
                _window_inside(x, W, top, left, pool_h, pool_w, out + oy * out_w + ox, source + oy * out_w + ox)
            else:
                _pool_window(x, H, W, top, left, pool_h, pool_w, out + oy * out_w + ox, source + oy * out_w + ox)


cdef inline void _window_inside(const floating *x, Py_ssize_t W, Py_ssize_t top, Py_ssize_t left,
                                Py_ssize_t pool_h, Py_ssize_t pool_w,
                                floating *best_out, int *best_cell_out) noexcept nogil:
    """A window inside the image: no bounds tests, and no branch on the data.

    Which cell holds the maximum is random on real data, so a branch per
    comparison would be mispredicted half the time: the maximum is kept with
    max and its cell with arithmetic. NaN, rare, goes to the exact loop.
    """
    cdef Py_ssize_t ky, kx
    cdef Py_ssize_t origin = top * W + left, best_cell = origin
    cdef floating best = x[origin]
    cdef bint nan_seen = 0
    if pool_h == 2 and pool_w == 2:  # the common case, unrolled
        _consider(x, origin + 1, &best, &best_cell, &nan_seen)
        _consider(x, origin + W, &best, &best_cell, &nan_seen)
        _consider(x, origin + W + 1, &best, &best_cell, &nan_seen)
    else:
        for ky in range(pool_h):
            for kx in range(pool_w):
                _consider(x, origin + ky * W + kx, &best, &best_cell, &nan_seen)
    if nan_seen:
        _pool_window(x, top + pool_h, W, top, left, pool_h, pool_w, best_out, best_cell_out)
    else:
        best_out[0] = best
        best_cell_out[0] = <int>best_cell


cdef inline void _consider(const floating *x, Py_ssize_t cell, floating *best, Py_ssize_t *best_cell,
                           bint *nan_seen) noexcept nogil:
    cdef floating value = x[cell]
    cdef Py_ssize_t take = value > best[0]
    best_cell[0] += take * (cell - best_cell[0])
    best[0] = value if value > best[0] else best[0]
    nan_seen[0] |= value != value


cdef void _pool_window(const floating *x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t top, Py_ssize_t left,
                       Py_ssize_t pool_h, Py_ssize_t pool_w, floating *best_out, int *best_cell_out) noexcept nogil:
    """One window, exactly: cells outside the image are -inf in their (ky, kx) place."""
    cdef Py_ssize_t ky, kx, iy, ix
    cdef floating best = -INFINITY, value
    cdef int best_cell = -1, cell
    for ky in range(pool_h):
        iy = top + ky
        for kx in range(pool_w):
            ix = left + kx
            if 0 <= iy < H and 0 <= ix < W:
                value = x[iy * W + ix]
                cell = <int>(iy * W + ix)
            else:
                value = -INFINITY
                cell = -1
            if (ky == 0 and kx == 0) or _beats(value, best):
                best = value
                best_cell = cell
    best_out[0] = best
    best_cell_out[0] = best_cell


cdef inline bint _beats(floating value, floating best) noexcept nogil:
    """True when ``value`` replaces the maximum so far: strictly larger, or the first NaN."""
    return value > best or (value != value and best == best)
