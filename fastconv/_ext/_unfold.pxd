# Unfolding one image into the transposed im2col layout, and folding it back.
#
# colT (C*fh*fw, out_h*out_w): row (c, ky, kx) holds, for every window, the
# image cell at that place of the window (0 in the padding). Rows are ``ld``
# elements apart, so that the images of a block can sit side by side.
#
# A window position o (0 <= o < count) covers input cells o * stride + offset
# + k; first_inside and end_inside give the range of positions whose cell lies
# inside [0, size), so that the copying loops run without a test per element.
from libc.string cimport memcpy, memset

from cython cimport floating


cdef inline Py_ssize_t first_inside(Py_ssize_t offset, Py_ssize_t stride) noexcept nogil:
    """Smallest o >= 0 with o * stride + offset >= 0."""
    if offset >= 0:
        return 0
    return (stride - 1 - offset) // stride


cdef inline Py_ssize_t end_inside(Py_ssize_t offset, Py_ssize_t stride, Py_ssize_t size,
                                  Py_ssize_t count, Py_ssize_t start) noexcept nogil:
    """One past the largest o < count with o * stride + offset < size, and never below ``start``."""
    cdef Py_ssize_t end
    if offset >= size:
        return start
    end = (size - 1 - offset) // stride + 1
    if end > count:
        end = count
    if end < start:
        end = start
    return end


cdef inline void tap_lines(Py_ssize_t offset, Py_ssize_t stride, Py_ssize_t size, Py_ssize_t out_h,
                           Py_ssize_t oy0, Py_ssize_t oy1, Py_ssize_t *lo, Py_ssize_t *hi) noexcept nogil:
    """Output lines [lo, hi) within [oy0, oy1) whose tap at ``offset`` lies inside [0, size)."""
    lo[0] = min(max(first_inside(offset, stride), oy0), oy1)
    hi[0] = max(min(end_inside(offset, stride, size, out_h, lo[0]), oy1), lo[0])


cdef inline void zero_side_columns(floating *row, Py_ssize_t out_w, Py_ssize_t oy_lo, Py_ssize_t oy_hi,
                                    Py_ssize_t ox_lo, Py_ssize_t ox_hi) noexcept nogil:
    """Zero the columns outside [ox_lo, ox_hi) of lines [oy_lo, oy_hi) of a colT row.

    They are zeroed down the lines: line by line, the compiler would turn
    each into a memset call for a cell or two.
    """
    cdef Py_ssize_t oy, ox
    for ox in range(ox_lo):
        for oy in range(oy_lo, oy_hi):
            row[oy * out_w + ox] = 0
    for ox in range(ox_hi, out_w):
        for oy in range(oy_lo, oy_hi):
            row[oy * out_w + ox] = 0


cdef inline void unfold_image(const floating *x, floating *colT, Py_ssize_t ld,
                              Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                              Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad,
                              Py_ssize_t out_h, Py_ssize_t out_w,
                              Py_ssize_t oy0, Py_ssize_t oy1) noexcept nogil:
    """Write the colT columns of output lines [oy0, oy1) of one image (rows ``ld`` apart).

    Column (oy - oy0) * out_w + ox holds window (oy, ox): a part of an image
    can be unfolded on its own, small enough to stay in cache.
    """
    cdef bint same_grid = stride == 1 and out_w == W
    cdef Py_ssize_t c, ky, kx, oy, ox, oy_lo, oy_hi, ox_lo, ox_hi, src, shift, j, j_lo, j_hi
    cdef Py_ssize_t base = oy0 * out_w  # column 0 is this window
    cdef floating *row
    cdef floating *line
    cdef const floating *plane
    for ky in range(fh):
        tap_lines(ky - pad, stride, H, out_h, oy0, oy1, &oy_lo, &oy_hi)
        for kx in range(fw):
            ox_lo = first_inside(kx - pad, stride)
            ox_hi = end_inside(kx - pad, stride, W, out_w, ox_lo)
            shift = (ky - pad) * W + kx - pad
            for c in range(C):
                row = colT + ((c * fh + ky) * fw + kx) * ld
                if same_grid:
                    # The row is the image shifted by ``shift`` cells: one long
                    # copy. Cells that wrap around from the neighbouring line
                    # are in the padding columns, zeroed below.
                    plane = x + c * H * W
                    j_lo = max(oy_lo * W, -shift)
                    j_hi = min(oy_hi * W, H * W - shift)
                    if j_hi > j_lo:  # the C library's memcpy uses the widest vector stores the CPU has
                        memcpy(row + j_lo - base, plane + j_lo + shift, (j_hi - j_lo) * sizeof(floating))
                else:
                    for oy in range(oy_lo, oy_hi):
                        line = row + oy * out_w - base
                        src = (c * H + oy * stride + ky - pad) * W + kx - pad
                        if stride == 1:
                            for ox in range(ox_lo, ox_hi):
                                line[ox] = x[src + ox]
                        else:
                            for ox in range(ox_lo, ox_hi):
                                line[ox] = x[src + ox * stride]
                zero_side_columns(row, out_w, oy_lo - oy0, oy_hi - oy0, ox_lo, ox_hi)
                if oy_lo > oy0:
                    memset(row, 0, (oy_lo - oy0) * out_w * sizeof(floating))
                if oy_hi < oy1:
                    memset(row + oy_hi * out_w - base, 0, (oy1 - oy_hi) * out_w * sizeof(floating))


cdef inline void fold_image(floating *colT, Py_ssize_t ld, floating *x,
                            Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                            Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad,
                            Py_ssize_t out_h, Py_ssize_t out_w,
                            Py_ssize_t oy0, Py_ssize_t oy1) noexcept nogil:
    """Add every row of colT (output lines [oy0, oy1), rows ``ld`` apart) onto the image cells it was
    taken from: the adjoint of unfolding.

    colT is scratch: its padding cells may be overwritten with zeros.
    """
    cdef bint same_grid = stride == 1 and out_w == W
    cdef Py_ssize_t c, ky, kx, oy, ox, oy_lo, oy_hi, ox_lo, ox_hi, dst, shift, j, j_lo, j_hi
    cdef Py_ssize_t base = oy0 * out_w
    cdef floating *row
    cdef const floating *line
    cdef floating *plane
    for c in range(C):
        for ky in range(fh):
            tap_lines(ky - pad, stride, H, out_h, oy0, oy1, &oy_lo, &oy_hi)
            for kx in range(fw):
                ox_lo = first_inside(kx - pad, stride)
                ox_hi = end_inside(kx - pad, stride, W, out_w, ox_lo)
                row = colT + ((c * fh + ky) * fw + kx) * ld
                if same_grid:
                    # as in unfolding: one long addition, once the padding
                    # columns (which would wrap around) hold zeros
                    zero_side_columns(row, out_w, oy_lo - oy0, oy_hi - oy0, ox_lo, ox_hi)
                    plane = x + c * H * W
                    shift = (ky - pad) * W + kx - pad
                    j_lo = max(oy_lo * W, -shift)
                    j_hi = min(oy_hi * W, H * W - shift)
                    for j in range(j_lo, j_hi):
                        plane[j + shift] += row[j - base]
                    continue
                for oy in range(oy_lo, oy_hi):
                    line = row + oy * out_w - base
                    dst = (c * H + oy * stride + ky - pad) * W + kx - pad
                    if stride == 1:
                        for ox in range(ox_lo, ox_hi):
                            x[dst + ox] += line[ox]
                    else:
                        for ox in range(ox_lo, ox_hi):
                            x[dst + ox * stride] += line[ox]
