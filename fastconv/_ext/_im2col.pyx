"""im2col and col2im in the book's layout, parallel over the images of a batch.

``col`` has one row per window, rows ordered (n, y, x), and one column per
window cell, columns ordered (c, ky, kx). For a fixed window and channel the
``filter_w`` cells of one filter row are adjacent in the image whatever the
stride, so each of them is one short contiguous copy, clipped at the border.
"""
from cython.parallel cimport prange
from libc.string cimport memset

from cython cimport floating

from fastconv._ext._window cimport end_inside, first_inside


def im2col(const floating[:, :, :, ::1] x, floating[:, ::1] col,
           Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
           int num_threads):
    """Fill ``col`` (N*out_h*out_w, C*filter_h*filter_w) with the windows of ``x``."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t out_h = (H + 2 * pad - filter_h) // stride + 1
    cdef Py_ssize_t out_w = (W + 2 * pad - filter_w) // stride + 1
    cdef Py_ssize_t row_len = C * filter_h * filter_w
    if col.shape[0] != N * out_h * out_w or col.shape[1] != row_len:
        raise ValueError("col has the wrong shape")
    cdef const floating *src = &x[0, 0, 0, 0]
    cdef floating *dst = &col[0, 0]
    cdef Py_ssize_t n
    for n in prange(N, nogil=True, schedule="dynamic", num_threads=num_threads):
        _unfold_image(src + n * C * H * W, dst + n * out_h * out_w * row_len,
                      C, H, W, filter_h, filter_w, stride, pad, out_h, out_w)


def col2im(const floating[:, ::1] col, floating[:, :, :, ::1] x,
           Py_ssize_t filter_h, Py_ssize_t filter_w, Py_ssize_t stride, Py_ssize_t pad,
           int num_threads):
    """Overwrite ``x`` with the sum of the windows in ``col`` put back where they came from."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t out_h = (H + 2 * pad - filter_h) // stride + 1
    cdef Py_ssize_t out_w = (W + 2 * pad - filter_w) // stride + 1
    cdef Py_ssize_t row_len = C * filter_h * filter_w
    if col.shape[0] != N * out_h * out_w or col.shape[1] != row_len:
        raise ValueError("col has the wrong shape")
    cdef const floating *src = &col[0, 0]
    cdef floating *dst = &x[0, 0, 0, 0]
    cdef Py_ssize_t n
    for n in prange(N, nogil=True, schedule="dynamic", num_threads=num_threads):
        memset(dst + n * C * H * W, 0, C * H * W * sizeof(floating))
        _fold_image(src + n * out_h * out_w * row_len, dst + n * C * H * W,
                    C, H, W, filter_h, filter_w, stride, pad, out_h, out_w)


cdef void _unfold_image(const floating *x, floating *col,
                        Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                        Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad,
                        Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    cdef Py_ssize_t oy, ox, c, ky, kx, top, left, ky_lo, ky_hi, kx_lo, kx_hi, src
    cdef floating *row
    cdef floating *cell
    for oy in range(out_h):
        top = oy * stride - pad
        ky_lo = first_inside(top, 1)
        ky_hi = end_inside(top, 1, H, fh, ky_lo)
        for ox in range(out_w):
            left = ox * stride - pad
            kx_lo = first_inside(left, 1)
            kx_hi = end_inside(left, 1, W, fw, kx_lo)
            row = col + (oy * out_w + ox) * C * fh * fw
            for c in range(C):
                for ky in range(fh):
                    cell = row + (c * fh + ky) * fw
                    if ky < ky_lo or ky >= ky_hi:
                        for kx in range(fw):
                            cell[kx] = 0
                        continue
                    src = (c * H + top + ky) * W + left
                    for kx in range(kx_lo):
                        cell[kx] = 0
                    for kx in range(kx_lo, kx_hi):
                        cell[kx] = x[src + kx]
                    for kx in range(kx_hi, fw):
                        cell[kx] = 0


cdef void _fold_image(const floating *col, floating *x,
                      Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                      Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad,
                      Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    cdef Py_ssize_t oy, ox, c, ky, kx, top, left, ky_lo, ky_hi, kx_lo, kx_hi, dst
    cdef const floating *row
    cdef const floating *cell
    for oy in range(out_h):
        top = oy * stride - pad
        ky_lo = first_inside(top, 1)
        ky_hi = end_inside(top, 1, H, fh, ky_lo)
        for ox in range(out_w):
            left = ox * stride - pad
            kx_lo = first_inside(left, 1)
            kx_hi = end_inside(left, 1, W, fw, kx_lo)
            row = col + (oy * out_w + ox) * C * fh * fw
            for c in range(C):
                for ky in range(ky_lo, ky_hi):
                    cell = row + (c * fh + ky) * fw
                    dst = (c * H + top + ky) * W + left
                    for kx in range(kx_lo, kx_hi):
                        x[dst + kx] += cell[kx]
