/* Which direct-convolution variant this CPU runs. */
#include "dconv.h"

const fc_dconv_functions_t *fc_dconv_avx512(int is_double);
const fc_dconv_functions_t *fc_dconv_avx2(int is_double);
const fc_dconv_functions_t *fc_dconv_generic(int is_double);

static int cpu_runs(int variant)
{
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    switch (variant) {
    /* these also check that the OS saves the wider registers */
    case FC_AVX512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2")
                           && __builtin_cpu_supports("fma");
    case FC_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return 1;
    }
#else
    return variant == FC_GENERIC;
#endif
}

const fc_dconv_functions_t *fc_dconv_functions(int variant, int is_double)
{
    switch (variant) {
    case FC_AVX512: return fc_dconv_avx512(is_double);
    case FC_AVX2: return fc_dconv_avx2(is_double);
    case FC_GENERIC: return fc_dconv_generic(is_double);
    default: return 0;
    }
}

int fc_dconv_available(int variant)
{
    return variant >= 0 && variant < FC_VARIANTS && cpu_runs(variant) && fc_dconv_functions(variant, 0) != 0;
}
