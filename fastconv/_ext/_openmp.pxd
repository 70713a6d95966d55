# OpenMP facts that exist whether or not the extension was built with OpenMP.
cdef extern from "_openmp_helpers.h":
    int FASTCONV_OPENMP
    int fastconv_omp_max_threads() nogil
    const char *FASTCONV_CYTHON_VERSION
