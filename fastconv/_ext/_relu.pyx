"""ReLU forward and backward over flat arrays, split into blocks across threads."""
from cython cimport floating

from fastconv._ext._parallel cimport fc_next_task, fc_task_fn, run_tasks

cdef enum:
    # elements handed to a thread at a time
    BLOCK = 1 << 15

# the same, for the caller's count of tasks
TASK_ELEMENTS = BLOCK


cdef struct _Job:
    const void *values   # x, or dout for backward
    void *out
    unsigned char *mask
    Py_ssize_t size
    long next


cdef inline bint _relu_off(floating x) noexcept nogil:
    """The ReLU's rule: off (output and gradient zero) where x <= 0; a NaN keeps it on, as the book's
    mask x <= 0 does."""
    return x <= 0


def relu_forward(const floating[::1] x, floating[::1] out, unsigned char[::1] mask, int num_threads):
    """out = x where the ReLU is on, else 0; mask = where it is off (x <= 0). NaN passes through with mask
    False."""
    cdef Py_ssize_t size = x.shape[0]
    if out.shape[0] != size or mask.shape[0] != size:
        raise ValueError("x, out and mask must have the same size")
    if size == 0:
        return
    cdef _Job job
    job.values, job.out, job.mask, job.size, job.next = &x[0], &out[0], &mask[0], size, 0
    cdef fc_task_fn work = _forward_float if floating is float else _forward_double
    with nogil:
        run_tasks(num_threads, work, &job)


def relu_backward(floating[::1] dout, const unsigned char[::1] mask, int num_threads):
    """Zero ``dout`` in place where ``mask`` is set."""
    cdef Py_ssize_t size = dout.shape[0]
    if mask.shape[0] != size:
        raise ValueError("dout and mask must have the same size")
    if size == 0:
        return
    cdef _Job job
    job.values, job.out, job.mask, job.size, job.next = NULL, &dout[0], <unsigned char *>&mask[0], size, 0
    cdef fc_task_fn work = _backward_float if floating is float else _backward_double
    with nogil:
        run_tasks(num_threads, work, &job)


cdef void _forward_blocks(floating *kind, _Job *job) noexcept nogil:
    # raw pointers: through memoryview structs the compiler reloads the data
    # pointers after every store and does not vectorize
    cdef const floating *x = <const floating *>job.values
    cdef floating *out = <floating *>job.out
    cdef Py_ssize_t block, blocks = (job.size + BLOCK - 1) // BLOCK
    while True:
        block = fc_next_task(&job.next)
        if block >= blocks:
            break
        _relu_block(x + block * BLOCK, out + block * BLOCK, job.mask + block * BLOCK,
                    min(BLOCK, job.size - block * BLOCK))


cdef void _backward_blocks(floating *kind, _Job *job) noexcept nogil:
    cdef floating *dout = <floating *>job.out
    cdef Py_ssize_t block, blocks = (job.size + BLOCK - 1) // BLOCK
    while True:
        block = fc_next_task(&job.next)
        if block >= blocks:
            break
        _mask_block(dout + block * BLOCK, job.mask + block * BLOCK, min(BLOCK, job.size - block * BLOCK))


cdef void _forward_float(void *job, int thread) noexcept nogil:
    _forward_blocks(<float *>NULL, <_Job *>job)


cdef void _forward_double(void *job, int thread) noexcept nogil:
    _forward_blocks(<double *>NULL, <_Job *>job)


cdef void _backward_float(void *job, int thread) noexcept nogil:
    _backward_blocks(<float *>NULL, <_Job *>job)


cdef void _backward_double(void *job, int thread) noexcept nogil:
    _backward_blocks(<double *>NULL, <_Job *>job)


cdef inline void _relu_block(const floating *x, floating *out, unsigned char *mask, Py_ssize_t count) noexcept nogil:
    # two loops over the block (it is in cache): each compiles to vector
    # selects; in one loop the float64 select became a mispredicted branch
    cdef Py_ssize_t i
    for i in range(count):
        out[i] = 0 if _relu_off(x[i]) else x[i]
    for i in range(count):
        mask[i] = _relu_off(x[i])


cdef inline void _mask_block(floating *dout, const unsigned char *mask, Py_ssize_t count) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(count):
        dout[i] = 0 if mask[i] else dout[i]
