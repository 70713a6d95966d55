/* Direct convolution kernels, portable variant: 16-byte vectors of the baseline instruction set
   (SSE2 on x86-64, NEON on AArch64), for CPUs without AVX2 (chosen at run time by dconv_dispatch.c). */
#include <string.h>
#include "dconv.h"

#if (defined(__GNUC__) || defined(__clang__)) && !defined(FASTCONV_NO_DIRECT_KERNELS)
#define FC_VARIANT generic
#define FC_VECTOR_BYTES 16
/* the tiles for the target's vector registers: 32 on AArch64 (NEON), 16 elsewhere (SSE2); the plan's
   fastconv._plan.REGISTERS["generic"] follows the same machine */
#if defined(__aarch64__)
#define FC_REGS 32
#else
#define FC_REGS 16
#endif
#include "dconv_variant.h"
#else
const fc_dconv_functions_t *fc_dconv_generic(int is_double) { (void)is_double; return 0; }
#endif
