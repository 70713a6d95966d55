/* Direct convolution kernels: the jobs they run and the variants they come in.
 *
 * The layouts, tiles, pairing of output-channel blocks, buffer sizes and thread
 * split are decided by fastconv/_plan.py; these structs carry its numbers. Each
 * variant (instruction set) is compiled, through dconv_variant.h, from
 * dconv_vector.h, dconv_forward.h and dconv_backward.h with the tiles of
 * dconv_tiles.h, in a file of its own (dconv_avx512.c, dconv_avx2.c,
 * dconv_generic.c), and chosen at run time by fc_dconv_functions.
 */
#ifndef FASTCONV_DCONV_H
#define FASTCONV_DCONV_H

#include <stddef.h>
#include <stdint.h>
#include "fc_pool.h"

/* Subnormal numbers read and computed as zero on the calling thread, until fc_restore_fp(the returned
   state). Late in training, gradients hold many subnormal floats, and every multiply-add on one takes a
   slow microcode path (backward ran twice as long). The state is per thread and restored: code outside
   the kernels never sees it. On x86 these are the MXCSR's DAZ and FTZ bits; on AArch64 the FPCR's FZ bit
   (24), which flushes both the inputs and the results of single and double precision operations. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
typedef unsigned fc_fp_state;
static inline fc_fp_state fc_flush_subnormals(void)
{
    unsigned saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040);
    return saved;
}
static inline void fc_restore_fp(fc_fp_state saved) { _mm_setcsr(saved); }
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
typedef uint64_t fc_fp_state;
#define FC_FPCR_FZ ((uint64_t)1 << 24)
/* the "memory" clobbers keep the kernel's loads, and so its arithmetic, between the two */
static inline fc_fp_state fc_flush_subnormals(void)
{
    uint64_t saved;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved) : : "memory");
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved | FC_FPCR_FZ) : "memory");
    return saved;
}
static inline void fc_restore_fp(fc_fp_state saved) { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved) : "memory"); }
#else
typedef unsigned fc_fp_state;
static inline fc_fp_state fc_flush_subnormals(void) { return 0; }
static inline void fc_restore_fp(fc_fp_state saved) { (void)saved; }
#endif

/* A kernel TASK_body(arg, thread) as the thread pool runs it, named TASK: subnormals flushed meanwhile. */
#define FC_FLUSHING_TASK(TASK)                                                                       \
    static void FC_NAME(TASK)(void *arg, int thread)                                                 \
    {                                                                                                \
        fc_fp_state fp = fc_flush_subnormals();                                                      \
        FC_NAME(TASK##_body)(arg, thread);                                                           \
        fc_restore_fp(fp);                                                                           \
    }

/* The ReLU's rule, on a value or (GCC/Clang vector extensions) a vector of values y: the ReLU is off (its
   output and its gradient are zero) where y <= 0; a NaN keeps it on, as the book's mask x <= 0 does. */
#define fc_relu_off(y) ((y) <= (__typeof__(y)){0})

/* Each thread's part of a kernel's scratch starts this many bytes late at most, to begin on a boundary
   of this many bytes. */
#define FC_SCRATCH_ALIGNMENT 64

/* One run of the forward tile (see TilePass in _plan.py). */
typedef struct {
    int in_channels, out_channels;
    int src_h, src_w, border_h, border_w; /* a source plane and the zeros around it */
    int in_h, in_w;                       /* padded plane */
    int out_h, out_w;                     /* valid outputs; the grid has out_h rows of in_w */
    int filter_h, filter_w;
    int k_tile, vectors, k_blocks, grid_tiles;
    int channel_lanes;                    /* 1: output channels in the lanes, vectors = pixels per tile */
    int c_chunk;                          /* channels-in-lanes tile: input channels per pass over the pixels */
    ptrdiff_t in_plane;                   /* in_h * in_w */
    ptrdiff_t image_stride;               /* padded planes of one image and the tail that may be read */
    ptrdiff_t grid_stride;                /* grid positions per output channel (grid_padded) */
} fc_tile_pass;

typedef struct {
    fc_tile_pass pass;
    ptrdiff_t batch;
    const void *x;          /* (N, C, H, W) */
    void *packed;           /* (N, image_stride): padded planes, kept for backward; NULL: none kept, each
                               image's planes go to the thread's scratch after its grid */
    const void *weights;    /* (k_blocks, C, FH, FW, k_tile) */
    const void *bias;       /* (k_blocks * k_tile,) */
    void *out;              /* (N, K, out_h, out_w) */
    void *scratch;          /* per thread: scratch_stride elements, aligned inside */
    ptrdiff_t scratch_stride;
    int relu;               /* 1: out = max(convolution, 0), a ReLU fused into the output */
    void *pooled;           /* NULL, or (N, K, pooled_h, pooled_w): out max-pooled over 2 x 2 windows with
                               stride 2; out is then NULL (each image's output stays in thread scratch) */
    int pooled_h, pooled_w;
    long next;              /* task counter */
} fc_forward_job;

typedef struct {
    fc_tile_pass forward;   /* geometry of the packed input */
    fc_tile_pass data;      /* the backward-data pass */
    ptrdiff_t batch;
    int lanes, w_blocks, groups;
    int one_channel;        /* a single input channel: dx from dout vectors (dx_one_channel), not the tile */
    int dt_cols;            /* one channel: columns of the zero-bordered dout, and elements per block */
    ptrdiff_t dt_block;
    const int *channel_tiles; /* (first, count) pairs */
    int n_channel_tiles;
    int pair_blocks;        /* 1: two blocks of lanes output channels through each channel tile at once */
    ptrdiff_t transposed, grid, planes, masked; /* elements of each part of a thread's scratch (the plan's
                               backward_buffers), laid out in this order */
    const void *packed;     /* forward's padded planes */
    const void *dout;       /* (N, K, out_h, out_w) */
    const void *relu_out;   /* NULL, or a fused forward's output: dout is then the ReLU's, masked by it */
    const void *weights;    /* backward-data packed weights; with one channel, the forward's for k_tile = lanes */
    const void *zeros;      /* data.k_blocks * data.k_tile zeros: the bias of the backward-data pass */
    void *dx;               /* (N, C, H, W) */
    void *dw_groups;        /* (groups, dw_group_elements) */
    ptrdiff_t dw_group_elements;
    double *db_groups;      /* (groups, K) */
    void *dw;               /* (K, C, FH, FW) */
    void *scratch;
    ptrdiff_t scratch_stride;
    long next;
} fc_backward_job;

typedef struct {
    int vector_bytes;       /* bytes of one vector */
    int registers;          /* vector registers the tiles may fill: the tiles of dconv_tiles.h it has */
    fc_task_fn forward;     /* fc_forward_job: one task per image */
    fc_task_fn backward;    /* fc_backward_job: one task per image group */
    fc_task_fn sum_groups;  /* fc_backward_job: dW from the groups, one task per (lane block, channel) */
    int (*has_tile)(int channel_lanes, int k_tile, int vectors); /* whether that forward tile is compiled */
    int (*has_weights_tile)(int channels, int paired); /* whether that backward-weights tile is compiled */
} fc_dconv_functions_t;

/* The variants, best first, as X(ID, name): the enum FC_<ID> (FC_AVX512 = 0, ...) and the name of each,
   in the order of fastconv._plan.VARIANTS (the backend checks it at import); fc_dconv_<name> gives the
   variant's kernels (dconv_<name>.c). */
#define FC_VARIANT_LIST(X) X(AVX512, avx512) X(AVX2, avx2) X(GENERIC, generic)
#define FC_VARIANT_ENUM(ID, name) FC_##ID,
enum { FC_VARIANT_LIST(FC_VARIANT_ENUM) FC_VARIANTS };
#undef FC_VARIANT_ENUM

/* The name of a variant ("avx512", ...), or NULL for a number that is none. */
const char *fc_dconv_variant_name(int variant);

/* 1 when the CPU (and OS) run the variant and it was compiled in. */
int fc_dconv_available(int variant);

/* The kernels of a variant for float32 (is_double = 0) or float64; NULL when not compiled in. */
const fc_dconv_functions_t *fc_dconv_functions(int variant, int is_double);

/* The tiles of dconv_tiles.h: kind FC_FORWARD_TILES, FC_PIXEL_TILES or FC_CHANNEL_TILES, for this many
   registers. Returns the number of tiles (0 for a list that does not exist) and, when i is below it,
   puts tile i's numbers in entry (the X-macro's arguments; the third is 0 for the forward lists). */
enum { FC_FORWARD_TILES = 0, FC_PIXEL_TILES = 1, FC_CHANNEL_TILES = 2 };
int fc_dconv_tiles(int kind, int registers, int i, int entry[3]);

#endif
