# Index arithmetic shared by the sliding-window kernels.
#
# A window position o (0 <= o < count) covers input cells o * stride + offset
# + k; these give the range of positions whose cell lies inside [0, size), so
# the loops that copy data run without a bounds test per element.


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
