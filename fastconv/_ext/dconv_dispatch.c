/* Which direct-convolution variant this CPU runs, and the tiles the variants are compiled for. */
#include "dconv.h"
#include "dconv_tiles.h"

#define FC_DECLARE(ID, name) const fc_dconv_functions_t *fc_dconv_##name(int is_double);
FC_VARIANT_LIST(FC_DECLARE)
#undef FC_DECLARE

const char *fc_dconv_variant_name(int variant)
{
#define FC_NAME_OF(ID, name) #name,
    static const char *const names[FC_VARIANTS] = {FC_VARIANT_LIST(FC_NAME_OF)};
#undef FC_NAME_OF
    return variant >= 0 && variant < FC_VARIANTS ? names[variant] : 0;
}

#if defined(_WIN32) && defined(__x86_64__)
/* Windows with GCC (MinGW-w64) or Clang (clang-cl, whose programs do not link the runtime that
   __builtin_cpu_supports needs): the CPU's features from CPUID, and the registers the OS saves from XCR0 */
#include <cpuid.h>

static unsigned long long xcr0(void)
{
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

static int cpu_runs(int variant)
{
    unsigned a, b, c, d;
    if (variant == FC_GENERIC)
        return 1;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE) || !(c & bit_AVX) || !(c & bit_FMA))
        return 0;
    const unsigned long long saved = xcr0();
    if ((saved & 0x6) != 0x6 || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & bit_AVX2))
        return 0; /* no AVX2, or the OS does not save the ymm registers */
    if (variant == FC_AVX2)
        return 1;
    /* AVX-512: the opmask and zmm registers saved too */
    return variant == FC_AVX512 && (b & bit_AVX512F) && (saved & 0xe6) == 0xe6;
}
#else
static int cpu_runs(int variant)
{
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
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
#endif

const fc_dconv_functions_t *fc_dconv_functions(int variant, int is_double)
{
    switch (variant) {
#define FC_CASE(ID, name) case FC_##ID: return fc_dconv_##name(is_double);
    FC_VARIANT_LIST(FC_CASE)
#undef FC_CASE
    default: return 0;
    }
}

int fc_dconv_available(int variant)
{
    return variant >= 0 && variant < FC_VARIANTS && cpu_runs(variant) && fc_dconv_functions(variant, 0) != 0;
}

#define FC_ENTRY2(a, b) {a, b, 0},
#define FC_ENTRY3(a, b, c) {a, b, c},
static const int forward_32[][3] = {FC_FORWARD_TILES_32(FC_ENTRY2)};
static const int forward_16[][3] = {FC_FORWARD_TILES_16(FC_ENTRY2)};
static const int pixel_32[][3] = {FC_PIXEL_TILES_32(FC_ENTRY2)};
static const int pixel_16[][3] = {FC_PIXEL_TILES_16(FC_ENTRY2)};
static const int channel_32[][3] = {FC_CHANNEL_TILES_32(FC_ENTRY3)};
static const int channel_16[][3] = {FC_CHANNEL_TILES_16(FC_ENTRY3)};
#define FC_LIST(kind, registers, table) {kind, registers, (int)(sizeof table / sizeof table[0]), table}
static const struct {
    int kind, registers, count;
    const int (*tiles)[3];
} tile_lists[] = {
    FC_LIST(FC_FORWARD_TILES, 32, forward_32), FC_LIST(FC_FORWARD_TILES, 16, forward_16),
    FC_LIST(FC_PIXEL_TILES, 32, pixel_32), FC_LIST(FC_PIXEL_TILES, 16, pixel_16),
    FC_LIST(FC_CHANNEL_TILES, 32, channel_32), FC_LIST(FC_CHANNEL_TILES, 16, channel_16),
};

int fc_dconv_tiles(int kind, int registers, int i, int entry[3])
{
    for (unsigned l = 0; l < sizeof tile_lists / sizeof tile_lists[0]; l++) {
        if (tile_lists[l].kind != kind || tile_lists[l].registers != registers)
            continue;
        if (i >= 0 && i < tile_lists[l].count)
            for (int j = 0; j < 3; j++)
                entry[j] = tile_lists[l].tiles[i][j];
        return tile_lists[l].count;
    }
    return 0;
}
