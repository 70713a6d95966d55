/* Direct convolution kernels, AVX-512 variant (chosen at run time by dconv_dispatch.c). */
#include <string.h>
#include "dconv.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(FASTCONV_NO_DIRECT_KERNELS)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx2,fma")
#endif
#define FC_VARIANT avx512
#define FC_VECTOR_BYTES 64
#define FC_REGS 32
#include "dconv_variant.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
const fc_dconv_functions_t *fc_dconv_avx512(int is_double) { (void)is_double; return 0; }
#endif
