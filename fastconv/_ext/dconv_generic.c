/* Direct convolution kernels, portable variant: 16-byte vectors of the baseline instruction set
   (SSE2 on x86-64, NEON on AArch64), for CPUs without AVX2. */
#include <string.h>
#include "dconv.h"

#if defined(__GNUC__)
#define FC_VARIANT_COMPILED 1
#define FC_REGS 16
#define FC_T float
#define FC_I int
#define FC_V 4
#define FC_NAME(x) x##_generic_f32
#include "dconv_impl.h"
#undef FC_T
#undef FC_I
#undef FC_V
#undef FC_NAME
#define FC_T double
#define FC_I long long
#define FC_V 2
#define FC_NAME(x) x##_generic_f64
#include "dconv_impl.h"
#endif

const fc_dconv_functions_t *fc_dconv_generic(int is_double)
{
#ifdef FC_VARIANT_COMPILED
    return is_double ? &functions_generic_f64 : &functions_generic_f32;
#else
    (void)is_double;
    return 0;
#endif
}
