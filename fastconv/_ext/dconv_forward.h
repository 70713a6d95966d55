/* Forward kernels of the direct convolution, for one element type and one vector width: the register
 * tiles of dconv_tiles.h, a pass of a tile over an image (run_pass, also the backward-data pass), and
 * the forward task. Included by dconv_variant.h after dconv_vector.h (see there for FC_T, FC_V, FC_NAME;
 * FC_REGS: the vector registers the tiles may fill). The algorithm and the meaning of every size are
 * described in fastconv/_plan.py.
 */
#include "pool2x2.h"

/* The loops over input channels and taps of a forward tile, for an fh x fw filter (FH, FW: the same, or
   the constant 3 for 3 x 3 filters, whose taps the compiler then unrolls). */
#define FC_FORWARD_TAPS(KT, PV, FH, FW)                                                              \
    for (int c = 0; c < channels; c++) {                                                             \
        const FC_T *ic = in + c * plane + p0;                                                        \
        _Pragma("GCC unroll 3") for (int kh = 0; kh < FH; kh++) {                                    \
            _Pragma("GCC unroll 3") for (int kw = 0; kw < FW; kw++) {                                \
                const FC_T *ip = ic + kh * in_w + kw;                                                \
                const FC_T *wp = w + ((ptrdiff_t)(c * FH + kh) * FW + kw) * KT;                      \
                VEC xv[PV];                                                                          \
                _Pragma("GCC unroll 8") for (int j = 0; j < PV; j++) xv[j] = FC_NAME(load)(ip + j * FC_V); \
                _Pragma("GCC unroll 16") for (int i = 0; i < KT; i++) {                              \
                    FC_T s = wp[i];                                                                  \
                    _Pragma("GCC unroll 8") for (int j = 0; j < PV; j++) acc[i][j] += xv[j] * s;     \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

/* Forward register tile: KT output channels x PV vectors of grid positions from p0 on.
   in: padded planes (channel c at in + c * plane); w: this block's packed weights. */
#define FC_FORWARD_TILE(KT, PV)                                                                      \
    static void FC_NAME(tile_##KT##_##PV)(const FC_T *in, ptrdiff_t plane, int channels, int in_w,   \
                                          int fh, int fw, const FC_T *w, const FC_T *bias,           \
                                          FC_T *grid, ptrdiff_t grid_stride, ptrdiff_t p0)           \
    {                                                                                                \
        VEC acc[KT][PV];                                                                             \
        _Pragma("GCC unroll 16") for (int i = 0; i < KT; i++)                                        \
            _Pragma("GCC unroll 8") for (int j = 0; j < PV; j++) acc[i][j] = (VEC){0} + bias[i];     \
        if (fh == 3 && fw == 3) {                                                                    \
            FC_FORWARD_TAPS(KT, PV, 3, 3)                                                            \
        } else {                                                                                     \
            FC_FORWARD_TAPS(KT, PV, fh, fw)                                                          \
        }                                                                                            \
        _Pragma("GCC unroll 16") for (int i = 0; i < KT; i++)                                        \
            _Pragma("GCC unroll 8") for (int j = 0; j < PV; j++)                                     \
                FC_NAME(store)(grid + i * grid_stride + p0 + j * FC_V, acc[i][j]);                   \
    }

/* The loops over input channels [c0, c1) and taps of a channels-in-lanes tile (see FC_FORWARD_TAPS). */
#define FC_PIXEL_TAPS(KV, P, FH, FW)                                                                 \
    for (int c = c0; c < c1; c++) {                                                                  \
        _Pragma("GCC unroll 3") for (int kh = 0; kh < FH; kh++) {                                    \
            _Pragma("GCC unroll 3") for (int kw = 0; kw < FW; kw++) {                                \
                const ptrdiff_t offset = c * plane + kh * in_w + kw;                                 \
                const FC_T *wp = w + ((ptrdiff_t)(c * FH + kh) * FW + kw) * (KV * FC_V);             \
                VEC wv[KV];                                                                          \
                _Pragma("GCC unroll 8") for (int v = 0; v < KV; v++) wv[v] = FC_NAME(load)(wp + v * FC_V); \
                _Pragma("GCC unroll 16") for (int p = 0; p < P; p++) {                               \
                    FC_T s = at[p][offset];                                                          \
                    _Pragma("GCC unroll 8") for (int v = 0; v < KV; v++) acc[p][v] += wv[v] * s;     \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

/* Forward tile with the output channels in the lanes: KV vectors of output channels x P output pixels
   (row-major over out_h x out_w, from q0 on), for planes too small for the grid tile to fill its vectors.
   Each multiply-add is a vector of weights times one input value. Input channels [c0, c1) are added to
   the bias (c0 = 0) or to the sums already in the rows q0... of T (pixels, KV * FC_V), where the results
   go. Pixels past the last are computed as the last one (rows T has, unused). */
#define FC_PIXEL_TILE(KV, P)                                                                         \
    static void FC_NAME(pixels_##KV##_##P)(const FC_T *in, ptrdiff_t plane, int channels, int in_w,  \
                                           int out_w, int pixels, int fh, int fw, const FC_T *w,     \
                                           const FC_T *bias, FC_T *T, int q0, int c0, int c1)        \
    {                                                                                                \
        const FC_T *at[P];                                                                           \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; p++) {                                       \
            int q = q0 + p < pixels ? q0 + p : pixels - 1;                                           \
            at[p] = in + (ptrdiff_t)(q / out_w) * in_w + q % out_w;                                  \
        }                                                                                            \
        VEC acc[P][KV];                                                                              \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; p++)                                         \
            _Pragma("GCC unroll 8") for (int v = 0; v < KV; v++)                                     \
                acc[p][v] = FC_NAME(load)(c0 ? T + (ptrdiff_t)(q0 + p) * (KV * FC_V) + v * FC_V      \
                                             : bias + v * FC_V);                                     \
        if (fh == 3 && fw == 3) {                                                                    \
            FC_PIXEL_TAPS(KV, P, 3, 3)                                                               \
        } else {                                                                                     \
            FC_PIXEL_TAPS(KV, P, fh, fw)                                                             \
        }                                                                                            \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; p++)                                         \
            _Pragma("GCC unroll 8") for (int v = 0; v < KV; v++)                                     \
                FC_NAME(store)(T + (ptrdiff_t)(q0 + p) * (KV * FC_V) + v * FC_V, acc[p][v]);         \
    }

typedef void (*FC_NAME(tile_fn))(const FC_T *, ptrdiff_t, int, int, int, int, const FC_T *, const FC_T *,
                                 FC_T *, ptrdiff_t, ptrdiff_t);
typedef void (*FC_NAME(pixel_fn))(const FC_T *, ptrdiff_t, int, int, int, int, int, int, const FC_T *, const FC_T *,
                                  FC_T *, int, int, int);

FC_TILES(FORWARD)(FC_FORWARD_TILE)
FC_TILES(PIXEL)(FC_PIXEL_TILE)

/* The compiled forward tile of k_tile channels x vectors vectors, or NULL. */
static FC_NAME(tile_fn) FC_NAME(forward_tile)(int k_tile, int vectors)
{
#define FC_CASE(KT, PV) if (k_tile == KT && vectors == PV) return FC_NAME(tile_##KT##_##PV);
    FC_TILES(FORWARD)(FC_CASE)
#undef FC_CASE
    return 0;
}

/* The compiled channels-in-lanes tile of k_vectors vectors of channels x pixels pixels, or NULL. */
static FC_NAME(pixel_fn) FC_NAME(pixel_tile)(int k_vectors, int pixels)
{
#define FC_CASE(KV, P) if (k_vectors == KV && pixels == P) return FC_NAME(pixels_##KV##_##P);
    FC_TILES(PIXEL)(FC_CASE)
#undef FC_CASE
    return 0;
}

static int FC_NAME(has_tile)(int channel_lanes, int k_tile, int vectors)
{
    if (channel_lanes)
        return k_tile % FC_V == 0 && FC_NAME(pixel_tile)(k_tile / FC_V, vectors) != 0;
    return FC_NAME(forward_tile)(k_tile, vectors) != 0;
}

/* Source planes (channels, src_h, src_w) into zero-bordered padded planes, and the image's tail zeroed. */
static void FC_NAME(pad_planes)(const fc_tile_pass *p, const FC_T *src, FC_T *dst)
{
    const size_t e = sizeof(FC_T);
    const int right = p->in_w - p->border_w - p->src_w;
    const ptrdiff_t below = (ptrdiff_t)(p->in_h - p->border_h - p->src_h) * p->in_w;
    for (int c = 0; c < p->in_channels; c++) {
        FC_T *d = dst + c * p->in_plane;
        const FC_T *s = src + (ptrdiff_t)c * p->src_h * p->src_w;
        /* the top border and the left border of the first row are one run, as are each row's right
           border and the next row's left border */
        memset(d, 0, ((size_t)p->border_h * p->in_w + p->border_w) * e);
        for (int r = 0; r < p->src_h; r++) {
            FC_T *row = d + (ptrdiff_t)(p->border_h + r) * p->in_w + p->border_w;
            FC_NAME(copy_row)(row, s + (ptrdiff_t)r * p->src_w, p->src_w);
            for (int i = 0; i < right + (r + 1 < p->src_h ? p->border_w : 0); i++)
                row[p->src_w + i] = 0;
        }
        memset(d + p->in_plane - below, 0, (size_t)below * e);
    }
    ptrdiff_t used = p->in_channels * p->in_plane;
    memset(dst + used, 0, (size_t)(p->image_stride - used) * e);
}

/* The tile over all grid tiles of one image, a block of output channels at a time, each block's valid
   grid columns copied into out while they are in cache. */
static void FC_NAME(run_pass)(const fc_tile_pass *p, const FC_T *in, const FC_T *weights, const FC_T *bias,
                              FC_T *grid, FC_T *out)
{
    if (p->channel_lanes) {
        /* output channels in the lanes: grid holds one block's (pixels, k_tile) results */
        FC_NAME(pixel_fn) tile = FC_NAME(pixel_tile)(p->k_tile / FC_V, p->vectors);
        const ptrdiff_t block_weights = (ptrdiff_t)p->in_channels * p->filter_h * p->filter_w * p->k_tile;
        const int pixels = p->out_h * p->out_w;
        for (int kb = 0; kb < p->k_blocks; kb++) {
            /* input channels a chunk at a time: the chunk's weights stay in the L1 cache for every tile */
            for (int c0 = 0; c0 < p->in_channels; c0 += p->c_chunk) {
                int c1 = c0 + p->c_chunk < p->in_channels ? c0 + p->c_chunk : p->in_channels;
                for (int q0 = 0; q0 < pixels; q0 += p->vectors)
                    tile(in, p->in_plane, p->in_channels, p->in_w, p->out_w, pixels, p->filter_h, p->filter_w,
                         weights + kb * block_weights, bias + kb * p->k_tile, grid, q0, c0, c1);
            }
            for (int v = 0; v < p->k_tile; v += FC_V) {
                int first = kb * p->k_tile + v;
                int count = p->out_channels - first < FC_V ? p->out_channels - first : FC_V;
                if (count > 0)
                    FC_NAME(untranspose_block)(grid + v, p->k_tile, count, pixels, out + (ptrdiff_t)first * pixels,
                                               pixels);
            }
        }
        return;
    }
    FC_NAME(tile_fn) tile = FC_NAME(forward_tile)(p->k_tile, p->vectors);
    const ptrdiff_t block_weights = (ptrdiff_t)p->in_channels * p->filter_h * p->filter_w * p->k_tile;
    const ptrdiff_t step = (ptrdiff_t)p->vectors * FC_V;
    for (int kb = 0; kb < p->k_blocks; kb++) {
        for (int t = 0; t < p->grid_tiles; t++)
            tile(in, p->in_plane, p->in_channels, p->in_w, p->filter_h, p->filter_w, weights + kb * block_weights,
                 bias + kb * p->k_tile, grid, p->grid_stride, t * step);
        for (int i = 0; i < p->k_tile && kb * p->k_tile + i < p->out_channels; i++) {
            FC_T *o = out + (ptrdiff_t)(kb * p->k_tile + i) * p->out_h * p->out_w;
            for (int oh = 0; oh < p->out_h; oh++)
                FC_NAME(copy_row)(o + (ptrdiff_t)oh * p->out_w, grid + i * p->grid_stride + (ptrdiff_t)oh * p->in_w,
                                  p->out_w);
        }
    }
}

static void FC_NAME(forward_task_body)(void *arg, int thread)
{
    fc_forward_job *job = arg;
    const fc_tile_pass *p = &job->pass;
    FC_T *grid = FC_NAME(aligned)(job->scratch, job->scratch_stride, thread);
    const ptrdiff_t x_image = (ptrdiff_t)p->in_channels * p->src_h * p->src_w;
    const ptrdiff_t out_image = (ptrdiff_t)p->out_channels * p->out_h * p->out_w;
    ptrdiff_t n;
    while ((n = fc_next_task(&job->next)) < job->batch) {
        /* the image's padded planes: kept for backward, or (no backward) in the thread's scratch */
        FC_T *packed = job->packed ? (FC_T *)job->packed + n * p->image_stride : grid + p->k_tile * p->grid_stride;
        FC_NAME(pad_planes)(p, (const FC_T *)job->x + n * x_image, packed);
        /* the image's output: in out, or (pooled) in scratch after the planes */
        FC_T *out = job->pooled ? grid + p->k_tile * p->grid_stride + p->image_stride
                                : (FC_T *)job->out + n * out_image;
        FC_NAME(run_pass)(p, packed, job->weights, job->bias, grid, out);
        if (job->relu)  /* while the image's output is still in cache */
            FC_NAME(relu_in_place)(out, out_image);
        if (job->pooled) {
            const ptrdiff_t plane = (ptrdiff_t)p->out_h * p->out_w, pooled = (ptrdiff_t)job->pooled_h * job->pooled_w;
            for (int k = 0; k < p->out_channels; k++)
                _Generic((FC_T)0, float: fc_pool2x2_plane_float, double: fc_pool2x2_plane_double)(
                    out + k * plane, p->out_h, p->out_w, (FC_T *)job->pooled + (n * p->out_channels + k) * pooled,
                    0, job->pooled_h, job->pooled_w);
        }
    }
}

FC_FLUSHING_TASK(forward_task)
