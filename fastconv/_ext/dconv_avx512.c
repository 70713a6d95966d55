/* Direct convolution kernels, AVX-512 variant (chosen at run time by dconv_dispatch.c). */
#include <string.h>
#include "dconv.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define FC_VARIANT_COMPILED 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx2,fma")
#endif

#define FC_REGS 32
#define FC_T float
#define FC_I int
#define FC_V 16
#define FC_NAME(x) x##_avx512_f32
#include "dconv_impl.h"
#undef FC_T
#undef FC_I
#undef FC_V
#undef FC_NAME
#define FC_T double
#define FC_I long long
#define FC_V 8
#define FC_NAME(x) x##_avx512_f64
#include "dconv_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif

const fc_dconv_functions_t *fc_dconv_avx512(int is_double)
{
#ifdef FC_VARIANT_COMPILED
    return is_double ? &functions_avx512_f64 : &functions_avx512_f32;
#else
    (void)is_double;
    return 0;
#endif
}
