"""ReLU forward and backward over flat arrays, split into blocks across threads."""
from cython.parallel cimport prange

from cython cimport floating

cdef enum:
    # elements per block: large enough that a thread's share is worth waking it for
    BLOCK = 1 << 15


def relu_forward(const floating[::1] x, floating[::1] out, unsigned char[::1] mask, int num_threads):
    """out = x where x > 0, else 0; mask = (x <= 0). NaN passes through with mask False."""
    cdef Py_ssize_t size = x.shape[0]
    if out.shape[0] != size or mask.shape[0] != size:
        raise ValueError("x, out and mask must have the same size")
    cdef Py_ssize_t block, start, end, i
    cdef bint off
    cdef floating value
    for block in prange((size + BLOCK - 1) // BLOCK, nogil=True, schedule="static", num_threads=num_threads):
        start = block * BLOCK
        end = min(start + BLOCK, size)
        for i in range(start, end):
            value = x[i]
            off = value <= 0
            mask[i] = off
            out[i] = 0 if off else value


def relu_backward(floating[::1] dout, const unsigned char[::1] mask, int num_threads):
    """Zero ``dout`` in place where ``mask`` is set."""
    cdef Py_ssize_t size = dout.shape[0]
    if mask.shape[0] != size:
        raise ValueError("dout and mask must have the same size")
    cdef Py_ssize_t block, start, end, i
    for block in prange((size + BLOCK - 1) // BLOCK, nogil=True, schedule="static", num_threads=num_threads):
        start = block * BLOCK
        end = min(start + BLOCK, size)
        for i in range(start, end):
            dout[i] = 0 if mask[i] else dout[i]
