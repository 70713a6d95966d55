"""How the compiled extensions were built: a probe fastconv reports in `info`."""
from fastconv._ext._openmp cimport FASTCONV_CYTHON_VERSION, FASTCONV_OPENMP, fastconv_omp_max_threads


def openmp_enabled():
    """True when the extensions were compiled with OpenMP."""
    return bool(FASTCONV_OPENMP)


def openmp_max_threads():
    """Threads an OpenMP parallel region would use now (1 in a serial build)."""
    return fastconv_omp_max_threads()


def cython_version():
    """The Cython version the extensions were compiled with."""
    return FASTCONV_CYTHON_VERSION.decode()
