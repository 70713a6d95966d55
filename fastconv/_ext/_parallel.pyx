"""How many threads an OpenMP region of the compiled kernels really runs on."""
from cython.parallel cimport prange, threadid


def team_size(int num_threads):
    """Threads that take part in a region asked for ``num_threads`` threads (1 in a serial build)."""
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    seen = bytearray(num_threads)
    cdef unsigned char[::1] flags = seen
    cdef Py_ssize_t i
    # one iteration per thread: every thread of the team marks its own slot
    for i in prange(num_threads, nogil=True, schedule="static", chunksize=1, num_threads=num_threads):
        flags[threadid()] = 1
    return sum(seen)
