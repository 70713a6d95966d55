/* One variant of the direct convolution kernels: the kernels for float and double, and the function
 * dispatch asks for them. Included by a variant file after its target pragma, with
 *   FC_VARIANT        the variant's name (avx512, avx2, generic)
 *   FC_VECTOR_BYTES   bytes of one vector
 *   FC_REGS           vector registers the tiles may fill (32 or 16: the tiles of dconv_tiles.h)
 * For each element type it sets
 *   FC_T      element type (float or double)
 *   FC_I      the integer type of its size (int or long long)
 *   FC_V      lanes of one vector
 *   FC_NAME   FC_NAME(x): x with the variant's and type's suffix
 * and includes the vector utilities, the forward kernels and the backward kernels.
 */
#include "dconv_tiles.h"

#define FC_GLUE_(a, b) a##b
#define FC_GLUE(a, b) FC_GLUE_(a, b)
#define FC_SUFFIXED(x, variant, type) FC_GLUE(x, FC_GLUE(_, FC_GLUE(variant, type)))

#define FC_FUNCTIONS                                                                                 \
    static const fc_dconv_functions_t FC_NAME(functions) = {                                         \
        FC_VECTOR_BYTES, FC_REGS, FC_NAME(forward_task), FC_NAME(backward_task), FC_NAME(sum_groups_task), \
        FC_NAME(has_tile), FC_NAME(has_weights_tile)};

#define FC_T float
#define FC_I int
#define FC_V (FC_VECTOR_BYTES / 4)
#define FC_NAME(x) FC_SUFFIXED(x, FC_VARIANT, _f32)
#include "dconv_vector.h"
#include "dconv_forward.h"
#include "dconv_backward.h"
FC_FUNCTIONS
#undef VEC
#undef FC_T
#undef FC_I
#undef FC_V
#undef FC_NAME

#define FC_T double
#define FC_I long long
#define FC_V (FC_VECTOR_BYTES / 8)
#define FC_NAME(x) FC_SUFFIXED(x, FC_VARIANT, _f64)
#include "dconv_vector.h"
#include "dconv_forward.h"
#include "dconv_backward.h"
FC_FUNCTIONS
#undef VEC
#undef FC_T
#undef FC_I
#undef FC_V
#undef FC_NAME

const fc_dconv_functions_t *FC_SUFFIXED(fc_dconv, FC_VARIANT, )(int is_double)
{
    return is_double ? &FC_SUFFIXED(functions, FC_VARIANT, _f64) : &FC_SUFFIXED(functions, FC_VARIANT, _f32);
}
