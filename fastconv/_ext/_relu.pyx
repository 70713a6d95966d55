"""ReLU forward and backward over flat arrays, split into blocks across threads."""
from cython.parallel cimport prange

from cython cimport floating

cdef enum:
    # elements handed to a thread at a time
    BLOCK = 1 << 15


def relu_forward(const floating[::1] x, floating[::1] out, unsigned char[::1] mask, int num_threads):
    """out = x where x > 0, else 0; mask = (x <= 0). NaN passes through with mask False."""
    cdef Py_ssize_t size = x.shape[0]
    if out.shape[0] != size or mask.shape[0] != size:
        raise ValueError("x, out and mask must have the same size")
    # raw pointers: through memoryview structs the compiler reloads the data
    # pointers after every store and does not vectorize
    cdef const floating *xp = &x[0]
    cdef floating *outp = &out[0]
    cdef unsigned char *maskp = &mask[0]
    cdef Py_ssize_t block
    for block in prange((size + BLOCK - 1) // BLOCK, nogil=True, schedule="dynamic", num_threads=num_threads):
        _relu_block(xp + block * BLOCK, outp + block * BLOCK, maskp + block * BLOCK,
                    min(BLOCK, size - block * BLOCK))


def relu_backward(floating[::1] dout, const unsigned char[::1] mask, int num_threads):
    """Zero ``dout`` in place where ``mask`` is set."""
    cdef Py_ssize_t size = dout.shape[0]
    if mask.shape[0] != size:
        raise ValueError("dout and mask must have the same size")
    cdef floating *doutp = &dout[0]
    cdef const unsigned char *maskp = &mask[0]
    cdef Py_ssize_t block
    for block in prange((size + BLOCK - 1) // BLOCK, nogil=True, schedule="dynamic", num_threads=num_threads):
        _mask_block(doutp + block * BLOCK, maskp + block * BLOCK, min(BLOCK, size - block * BLOCK))


cdef inline void _relu_block(const floating *x, floating *out, unsigned char *mask, Py_ssize_t count) noexcept nogil:
    # two loops over the block (it is in cache): each compiles to vector
    # selects; in one loop the float64 select became a mispredicted branch
    cdef Py_ssize_t i
    for i in range(count):
        out[i] = 0 if x[i] <= 0 else x[i]
    for i in range(count):
        mask[i] = x[i] <= 0


cdef inline void _mask_block(floating *dout, const unsigned char *mask, Py_ssize_t count) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(count):
        dout[i] = 0 if mask[i] else dout[i]
