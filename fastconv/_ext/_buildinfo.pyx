"""How the compiled extensions were built: a probe fastconv reports in `info`."""

cdef extern from *:
    """
    #ifndef FASTCONV_CYTHON_VERSION
    #define FASTCONV_CYTHON_VERSION "unknown"
    #endif
    """
    const char *FASTCONV_CYTHON_VERSION


def cython_version():
    """The Cython version the extensions were compiled with."""
    return FASTCONV_CYTHON_VERSION.decode()
