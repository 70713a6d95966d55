/* OpenMP queries that compile to serial stand-ins when OpenMP is off. */
#ifndef FASTCONV_OPENMP_HELPERS_H
#define FASTCONV_OPENMP_HELPERS_H
#ifdef _OPENMP
#include <omp.h>
#define FASTCONV_OPENMP 1
static int fastconv_omp_max_threads(void) { return omp_get_max_threads(); }
#else
#define FASTCONV_OPENMP 0
static int fastconv_omp_max_threads(void) { return 1; }
#endif
#ifndef FASTCONV_CYTHON_VERSION
#define FASTCONV_CYTHON_VERSION "unknown"
#endif
#endif
