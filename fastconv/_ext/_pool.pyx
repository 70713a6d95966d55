"""Max pooling by direct loops over each (image, channel) plane, in NCHW.

Cells outside the image count as -inf: they take part in the comparison,
in their (ky, kx) place, but never beat a real value. The first maximum in
(ky, kx) order wins ties, and NaN counts as larger than any number, as in
``numpy.argmax``. For every output the forward pass stores where its maximum
came from: the flat index y * W + x inside the plane, or -1 when a padding
cell won (possible only when a window holds nothing but -inf), in which case
its gradient is dropped.
"""
from cython.parallel cimport prange
from libc.math cimport INFINITY
from libc.string cimport memset

from cython cimport floating


def maxpool_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out, int[::1] source,
                    Py_ssize_t pool_h, Py_ssize_t pool_w, Py_ssize_t stride, Py_ssize_t pad,
                    int num_threads):
    """Fill ``out`` (N, C, out_h, out_w) and ``source`` (N*C*out_h*out_w,)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t out_h = out.shape[2], out_w = out.shape[3]
    if (out.shape[0] != N or out.shape[1] != C
            or out_h != (H + 2 * pad - pool_h) // stride + 1 or out_w != (W + 2 * pad - pool_w) // stride + 1):
        raise ValueError("out has the wrong shape")
    if source.shape[0] != N * C * out_h * out_w:
        raise ValueError("source has the wrong size")
    cdef const floating *xp = &x[0, 0, 0, 0]
    cdef floating *outp = &out[0, 0, 0, 0]
    cdef int *sourcep = &source[0]
    cdef Py_ssize_t plane
    for plane in prange(N * C, nogil=True, schedule="static", num_threads=num_threads):
        _pool_plane(xp + plane * H * W, outp + plane * out_h * out_w, sourcep + plane * out_h * out_w,
                    H, W, pool_h, pool_w, stride, pad, out_h, out_w)


def maxpool_backward(const floating[:, :, :, ::1] dout, const int[::1] source, floating[:, :, :, ::1] dx,
                     int num_threads):
    """Overwrite ``dx`` (N, C, H, W) with each gradient of ``dout`` added at its window's maximum."""
    cdef Py_ssize_t N = dx.shape[0], C = dx.shape[1], H = dx.shape[2], W = dx.shape[3]
    cdef Py_ssize_t out_hw = dout.shape[2] * dout.shape[3]
    if dout.shape[0] != N or dout.shape[1] != C or source.shape[0] != N * C * out_hw:
        raise ValueError("dout, source and dx do not match")
    cdef const floating *doutp = &dout[0, 0, 0, 0]
    cdef const int *sourcep = &source[0]
    cdef floating *dxp = &dx[0, 0, 0, 0]
    cdef floating *dx_plane
    cdef Py_ssize_t plane, o
    cdef int cell
    for plane in prange(N * C, nogil=True, schedule="static", num_threads=num_threads):
        dx_plane = dxp + plane * H * W
        memset(dx_plane, 0, H * W * sizeof(floating))
        for o in range(out_hw):
            cell = sourcep[plane * out_hw + o]
            if cell >= 0:
                dx_plane[cell] += doutp[plane * out_hw + o]


cdef void _pool_plane(const floating *x, floating *out, int *source,
                      Py_ssize_t H, Py_ssize_t W, Py_ssize_t pool_h, Py_ssize_t pool_w,
                      Py_ssize_t stride, Py_ssize_t pad, Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    cdef Py_ssize_t oy, ox, ky, kx, iy, ix, top, left
    cdef floating best, value
    cdef int best_cell, cell
    cdef bint inside
    for oy in range(out_h):
        top = oy * stride - pad
        for ox in range(out_w):
            left = ox * stride - pad
            if top >= 0 and left >= 0 and top + pool_h <= H and left + pool_w <= W:
                _window_inside(x, W, top, left, pool_h, pool_w, &best, &best_cell)
            else:
                best = -INFINITY  # the value of the first cell if it is padding
                best_cell = -1
                for ky in range(pool_h):
                    iy = top + ky
                    for kx in range(pool_w):
                        ix = left + kx
                        inside = 0 <= iy < H and 0 <= ix < W
                        if inside:
                            value = x[iy * W + ix]
                            cell = <int>(iy * W + ix)
                        else:
                            value = -INFINITY
                            cell = -1
                        if (ky == 0 and kx == 0) or _beats(value, best):
                            best = value
                            best_cell = cell
            out[oy * out_w + ox] = best
            source[oy * out_w + ox] = best_cell


cdef inline void _window_inside(const floating *x, Py_ssize_t W, Py_ssize_t top, Py_ssize_t left,
                                Py_ssize_t pool_h, Py_ssize_t pool_w,
                                floating *best_out, int *best_cell_out) noexcept nogil:
    """The window lies inside the image: no bounds tests and no data-dependent branches.

    Which cell holds the maximum is random on real data, so a branch per
    comparison is mispredicted half the time; the running maximum is kept
    with a max and the index with arithmetic instead. NaN, rare, is handled
    afterwards by the exact loop.
    """
    cdef Py_ssize_t ky, kx, cell, take
    cdef Py_ssize_t best_cell = top * W + left
    cdef floating best = x[best_cell], value
    cdef bint nan_seen = 0
    for ky in range(pool_h):
        for kx in range(pool_w):
            cell = (top + ky) * W + left + kx
            value = x[cell]
            take = value > best
            best_cell += take * (cell - best_cell)
            best = value if value > best else best
            nan_seen |= value != value
    if nan_seen:
        best_cell = top * W + left
        best = x[best_cell]
        for ky in range(pool_h):
            for kx in range(pool_w):
                cell = (top + ky) * W + left + kx
                if _beats(x[cell], best):
                    best = x[cell]
                    best_cell = cell
    best_out[0] = best
    best_cell_out[0] = <int>best_cell


cdef inline bint _beats(floating value, floating best) noexcept nogil:
    """True when ``value`` replaces the maximum so far: strictly larger, or the first NaN."""
    # bitwise, not short-circuit: no branch to mispredict on random data
    return (value > best) | ((value != value) & (best == best))
