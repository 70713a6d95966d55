/* Direct convolution kernels for one element type and one vector width.
 *
 * Included by the variant files with
 *   FC_T      element type (float or double)
 *   FC_I      the integer type of its size (int or long long)
 *   FC_V      lanes of one vector
 *   FC_REGS   vector registers the tiles may fill (32 or 16)
 *   FC_NAME   FC_NAME(x): x with the variant's and type's suffix
 * (dconv_variant.h sets them).
 * The algorithm and the meaning of every size are described in
 * fastconv/_plan.py. The vectors are GCC/Clang vector extensions: the variant
 * file's target pragma makes them AVX-512, AVX2 or baseline SIMD.
 */
#include "pool2x2.h"

#define VEC FC_NAME(vec)
typedef FC_T VEC __attribute__((vector_size(FC_V * sizeof(FC_T))));
/* a VEC's lanes in double */
typedef double FC_NAME(dvec) __attribute__((vector_size(FC_V * sizeof(double))));

static inline VEC FC_NAME(load)(const FC_T *p)
{
    VEC v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void FC_NAME(store)(FC_T *p, VEC v) { __builtin_memcpy(p, &v, sizeof v); }

static inline FC_T *FC_NAME(aligned)(void *scratch, long stride, int thread)
{
    /* each thread's region starts on a 64-byte boundary (the plan leaves room for it) */
    unsigned long p = (unsigned long)((FC_T *)scratch + (long)thread * stride);
    return (FC_T *)((p + 63) & ~63UL);
}

/* dst[0:n] = src[0:n] for the short rows of an image, without a call per row: whole vectors, the
   last one overlapping the one before. */
static inline void FC_NAME(copy_row)(FC_T *dst, const FC_T *src, int n)
{
    if (n < FC_V) {
        for (int i = 0; i < n; i++)
            dst[i] = src[i];
        return;
    }
    int i = 0;
    for (; i + FC_V <= n; i += FC_V)
        FC_NAME(store)(dst + i, FC_NAME(load)(src + i));
    if (i < n)
        FC_NAME(store)(dst + n - FC_V, FC_NAME(load)(src + n - FC_V));
}

/* the shuffle indices of transpose_registers, one per lane */
#if defined(__GNUC__) && !defined(__clang__)
typedef FC_I FC_NAME(index) __attribute__((vector_size(FC_V * sizeof(FC_T))));
#endif

/* all bits set in the lanes where a comparison of VECs holds */
typedef FC_I FC_NAME(lanemask) __attribute__((vector_size(FC_V * sizeof(FC_T))));

/* v with zeros where y <= 0 (a NaN in y keeps v, as the book's mask x <= 0 does) */
static inline VEC FC_NAME(zero_where_not_positive)(VEC v, VEC y)
{
    return (VEC)((FC_NAME(lanemask))v & ~(FC_NAME(lanemask))(y <= (VEC){0}));
}

/* ReLU of values[0:n], in place: the forward epilogue of a convolution followed by a ReLU. */
static void FC_NAME(relu_in_place)(FC_T *values, long n)
{
    long i = 0;
    for (; i + FC_V <= n; i += FC_V) {
        VEC v = FC_NAME(load)(values + i);
        FC_NAME(store)(values + i, FC_NAME(zero_where_not_positive)(v, v));
    }
    for (; i < n; i++)
        values[i] = values[i] <= 0 ? 0 : values[i];
}

/* dst = dy with zeros where the forward's ReLU output y is <= 0: the ReLU's backward, on one image. */
static void FC_NAME(relu_gradient)(const FC_T *dy, const FC_T *y, long n, FC_T *dst)
{
    long i = 0;
    for (; i + FC_V <= n; i += FC_V)
        FC_NAME(store)(dst + i, FC_NAME(zero_where_not_positive)(FC_NAME(load)(dy + i), FC_NAME(load)(y + i)));
    for (; i < n; i++)
        dst[i] = y[i] <= 0 ? 0 : dy[i];
}

#if defined(__GNUC__) && !defined(__clang__)
/* r[i][j] <-> r[j][i], in registers: stage s swaps the b x b off-diagonal sub-blocks of every 2b x 2b
   block (b = FC_V / 2, FC_V / 4, ..., 1); the shuffle indices are constants */
#define FC_LO(j, b) (((j) & (b)) ? FC_V + (j) - (b) : (j))
#define FC_HI(j, b) (((j) & (b)) ? FC_V + (j) : (j) + (b))
#if FC_V == 16
#define FC_INDICES(F, b) {F(0, b), F(1, b), F(2, b), F(3, b), F(4, b), F(5, b), F(6, b), F(7, b), \
                          F(8, b), F(9, b), F(10, b), F(11, b), F(12, b), F(13, b), F(14, b), F(15, b)}
#elif FC_V == 8
#define FC_INDICES(F, b) {F(0, b), F(1, b), F(2, b), F(3, b), F(4, b), F(5, b), F(6, b), F(7, b)}
#elif FC_V == 4
#define FC_INDICES(F, b) {F(0, b), F(1, b), F(2, b), F(3, b)}
#else
#define FC_INDICES(F, b) {F(0, b), F(1, b)}
#endif

static inline void FC_NAME(transpose_stage)(VEC r[FC_V], int b, FC_NAME(index) lo, FC_NAME(index) hi)
{
    _Pragma("GCC unroll 16") for (int i = 0; i < FC_V; i++) {
        if (i & b)
            continue;
        VEC a = r[i], c = r[i + b];
        r[i] = __builtin_shuffle(a, c, lo);
        r[i + b] = __builtin_shuffle(a, c, hi);
    }
}

static inline void FC_NAME(transpose_registers)(VEC r[FC_V])
{
#if FC_V >= 16
    FC_NAME(transpose_stage)(r, 8, (FC_NAME(index))FC_INDICES(FC_LO, 8), (FC_NAME(index))FC_INDICES(FC_HI, 8));
#endif
#if FC_V >= 8
    FC_NAME(transpose_stage)(r, 4, (FC_NAME(index))FC_INDICES(FC_LO, 4), (FC_NAME(index))FC_INDICES(FC_HI, 4));
#endif
#if FC_V >= 4
    FC_NAME(transpose_stage)(r, 2, (FC_NAME(index))FC_INDICES(FC_LO, 2), (FC_NAME(index))FC_INDICES(FC_HI, 2));
#endif
    FC_NAME(transpose_stage)(r, 1, (FC_NAME(index))FC_INDICES(FC_LO, 1), (FC_NAME(index))FC_INDICES(FC_HI, 1));
}
#undef FC_LO
#undef FC_HI
#undef FC_INDICES
#endif

/* The rows of one block of count <= FC_V output channels of dy (count, out_h * out_w) as (row, column,
   lane) vectors in rows dt_cols vectors apart (dst: the first pixel's; dt_cols = out_w: (pixel, lane)
   order), with zeros where y (a fused ReLU's output, or NULL) is <= 0. FC_V x FC_V squares are transposed
   in registers (GCC's two-vector shuffles), the rest element by element. Lanes of missing channels are
   left as they are (zero). */
static void FC_NAME(transpose_bordered)(const FC_T *dy, const FC_T *y, int count, int out_h, int out_w,
                                        FC_T *dst, int dt_cols)
{
    const int pixels = out_h * out_w;
    int q0 = 0;
#if defined(__GNUC__) && !defined(__clang__)
    if (count == FC_V) {
        int oh = 0, ow = 0;  /* the position of pixel q0 + j */
        for (; q0 + FC_V <= pixels; q0 += FC_V) {
            VEC r[FC_V];
            if (y) {
                _Pragma("GCC unroll 16") for (int i = 0; i < FC_V; i++)
                    r[i] = FC_NAME(zero_where_not_positive)(FC_NAME(load)(dy + (long)i * pixels + q0),
                                                            FC_NAME(load)(y + (long)i * pixels + q0));
            } else {
                _Pragma("GCC unroll 16") for (int i = 0; i < FC_V; i++)
                    r[i] = FC_NAME(load)(dy + (long)i * pixels + q0);
            }
            FC_NAME(transpose_registers)(r);
            _Pragma("GCC unroll 16") for (int j = 0; j < FC_V; j++) {
                FC_NAME(store)(dst + ((long)oh * dt_cols + ow) * FC_V, r[j]);
                if (++ow == out_w) {
                    ow = 0;
                    oh++;
                }
            }
        }
    }
#endif
    for (int q = q0; q < pixels; q++) {
        FC_T *d = dst + ((long)(q / out_w) * dt_cols + q % out_w) * FC_V;
        for (int i = 0; i < count; i++)
            d[i] = y && y[(long)i * pixels + q] <= 0 ? 0 : dy[(long)i * pixels + q];
    }
}

/* The opposite of transpose_bordered with dt_cols = out_w: rows[j * row_stride + q] = T[q * t_stride + j] for j < count (channels)
   and q < pixels. */
static void FC_NAME(untranspose_block)(const FC_T *T, long t_stride, int count, int pixels, FC_T *rows,
                                       long row_stride)
{
    int q0 = 0;
#if defined(__GNUC__) && !defined(__clang__)
    for (; q0 + FC_V <= pixels; q0 += FC_V) {
        VEC r[FC_V];
        _Pragma("GCC unroll 16") for (int i = 0; i < FC_V; i++) r[i] = FC_NAME(load)(T + (long)(q0 + i) * t_stride);
        FC_NAME(transpose_registers)(r);
        for (int j = 0; j < count; j++)
            FC_NAME(store)(rows + (long)j * row_stride + q0, r[j]);
    }
#endif
    for (int j = 0; j < count; j++)
        for (int q = q0; q < pixels; q++)
            rows[(long)j * row_stride + q] = T[(long)q * t_stride + j];
}

/* out[j] = the sum of the lanes of r[j], for j < n (lanes added in a fixed order). */
static inline void FC_NAME(lane_sums)(VEC r[FC_V], FC_T *out, int n)
{
#if defined(__GNUC__) && !defined(__clang__)
    FC_NAME(transpose_registers)(r);
    VEC sum = r[0];
    _Pragma("GCC unroll 16") for (int l = 1; l < FC_V; l++) sum += r[l];
    if (n == FC_V) {
        FC_NAME(store)(out, sum);
        return;
    }
    for (int j = 0; j < n; j++)
        out[j] = sum[j];
#else
    for (int j = 0; j < n; j++) {
        FC_T sum = r[j][0];
        for (int l = 1; l < FC_V; l++)
            sum += r[j][l];
        out[j] = sum;
    }
#endif
}

/* dx of a single-channel input, (H, W), from the image's dout in (row, column, lane) order with a zero
   border of FH - 1 - pad rows and FW - 1 - pad columns (dTp, blocks of dt_block elements), and the
   weights as (block, FH, FW, lane) vectors: each dx value is a sum over taps of dout vectors times
   weight vectors, whose lanes are added FC_V values at a time. */
static void FC_NAME(dx_one_channel)(const FC_T *dTp, long dt_block, int dt_cols, int w_blocks, const FC_T *wv,
                                    int fh, int fw, int H, int W, FC_T *dx)
{
    for (int ih = 0; ih < H; ih++) {
        for (int iw0 = 0; iw0 < W; iw0 += FC_V) {
            VEC acc[FC_V];
            _Pragma("GCC unroll 16") for (int j = 0; j < FC_V; j++) acc[j] = (VEC){0};
            for (int kb = 0; kb < w_blocks; kb++) {
                for (int kh = 0; kh < fh; kh++) {
                    for (int kw = 0; kw < fw; kw++) {
                        VEC w = FC_NAME(load)(wv + ((long)(kb * fh + kh) * fw + kw) * FC_V);
                        const FC_T *src = dTp + kb * dt_block
                                          + ((long)(ih + fh - 1 - kh) * dt_cols + iw0 + fw - 1 - kw) * FC_V;
                        _Pragma("GCC unroll 16") for (int j = 0; j < FC_V; j++)
                            acc[j] += FC_NAME(load)(src + (long)j * FC_V) * w;
                    }
                }
            }
            FC_NAME(lane_sums)(acc, dx + (long)ih * W + iw0, W - iw0 < FC_V ? W - iw0 : FC_V);
        }
    }
}

/* Sum of values[0:count] in double: vector partial sums, then their lanes in order. */
static double FC_NAME(row_sum)(const FC_T *values, int count)
{
    VEC partial = (VEC){0};
    int i = 0;
    for (; i + FC_V <= count; i += FC_V)
        partial += FC_NAME(load)(values + i);
    double sum = 0;
    for (int lane = 0; lane < FC_V; lane++)
        sum += partial[lane];
    for (; i < count; i++)
        sum += values[i];
    return sum;
}

/* The loops over input channels and taps of a forward tile, for an fh x fw filter (FH, FW: the same, or
   the constant 3 for 3 x 3 filters, whose taps the compiler then unrolls). */
#define FC_FORWARD_TAPS(KT, PV, FH, FW)                                                              \
    for (int c = 0; c < channels; c++) {                                                             \
        const FC_T *ic = in + c * plane + p0;                                                        \
        _Pragma("GCC unroll 3") for (int kh = 0; kh < FH; kh++) {                                    \
            _Pragma("GCC unroll 3") for (int kw = 0; kw < FW; kw++) {                                \
                const FC_T *ip = ic + kh * in_w + kw;                                                \
                const FC_T *wp = w + ((long)(c * FH + kh) * FW + kw) * KT;                           \
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
    static void FC_NAME(tile_##KT##_##PV)(const FC_T *in, long plane, int channels, int in_w,       \
                                          int fh, int fw, const FC_T *w, const FC_T *bias,           \
                                          FC_T *grid, long grid_stride, long p0)                     \
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
                const long offset = c * plane + kh * in_w + kw;                                      \
                const FC_T *wp = w + ((long)(c * FH + kh) * FW + kw) * (KV * FC_V);                  \
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
    static void FC_NAME(pixels_##KV##_##P)(const FC_T *in, long plane, int channels, int in_w,      \
                                           int out_w, int pixels, int fh, int fw, const FC_T *w,     \
                                           const FC_T *bias, FC_T *T, int q0, int c0, int c1)        \
    {                                                                                                \
        const FC_T *at[P];                                                                           \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; p++) {                                       \
            int q = q0 + p < pixels ? q0 + p : pixels - 1;                                           \
            at[p] = in + (long)(q / out_w) * in_w + q % out_w;                                       \
        }                                                                                            \
        VEC acc[P][KV];                                                                              \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; p++)                                         \
            _Pragma("GCC unroll 8") for (int v = 0; v < KV; v++)                                     \
                acc[p][v] = FC_NAME(load)(c0 ? T + (long)(q0 + p) * (KV * FC_V) + v * FC_V : bias + v * FC_V); \
        if (fh == 3 && fw == 3) {                                                                    \
            FC_PIXEL_TAPS(KV, P, 3, 3)                                                               \
        } else {                                                                                     \
            FC_PIXEL_TAPS(KV, P, fh, fw)                                                             \
        }                                                                                            \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; p++)                                         \
            _Pragma("GCC unroll 8") for (int v = 0; v < KV; v++)                                     \
                FC_NAME(store)(T + (long)(q0 + p) * (KV * FC_V) + v * FC_V, acc[p][v]);              \
    }

/* Backward-weights tile: CT input channels for one tap and one block of FC_V output channels,
   summed over the pixels of one image into acc_mem (channel i at acc_mem + i * cstride).
   x: channel 0 of the tile, already moved by the tap; dT: the image's dout, (pixels, FC_V).
   With few channels, U interleaved partial sums (pixel ow goes to sum ow % U) keep enough
   independent multiply-adds in flight; they are added in order at the end. */
#define FC_WEIGHTS_TILE(CT, U)                                                                       \
    static void FC_NAME(dw_##CT)(const FC_T *x, long plane, int in_w, const FC_T *dT, int out_h,     \
                                 int out_w, FC_T *acc_mem, long cstride)                             \
    {                                                                                                \
        VEC acc[U][CT];                                                                              \
        _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++) {                                      \
            acc[0][i] = FC_NAME(load)(acc_mem + i * cstride);                                        \
            _Pragma("GCC unroll 8") for (int u = 1; u < U; u++) acc[u][i] = (VEC){0};                \
        }                                                                                            \
        const int whole = out_w - out_w % U;                                                         \
        for (int oh = 0; oh < out_h; oh++) {                                                         \
            const FC_T *xr = x + (long)oh * in_w;                                                    \
            const FC_T *dr = dT + (long)oh * out_w * FC_V;                                           \
            for (int ow = 0; ow < whole; ow += U) {                                                  \
                _Pragma("GCC unroll 8") for (int u = 0; u < U; u++) {                                \
                    VEC d = FC_NAME(load)(dr + (long)(ow + u) * FC_V);                               \
                    _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++)                            \
                        acc[u][i] += d * xr[i * plane + ow + u];                                     \
                }                                                                                    \
            }                                                                                        \
            for (int ow = whole; ow < out_w; ow++) {                                                 \
                VEC d = FC_NAME(load)(dr + (long)ow * FC_V);                                         \
                _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++)                                \
                    acc[ow % U][i] += d * xr[i * plane + ow];                                        \
            }                                                                                        \
        }                                                                                            \
        _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++) {                                      \
            VEC sum = acc[0][i];                                                                     \
            _Pragma("GCC unroll 8") for (int u = 1; u < U; u++) sum += acc[u][i];                    \
            FC_NAME(store)(acc_mem + i * cstride, sum);                                              \
        }                                                                                            \
    }

/* The backward-weights tile for two blocks of FC_V output channels at once (dT and acc_mem of the second
   block kstride elements after the first's): each x value loaded feeds two multiply-adds. Every
   accumulator adds the same products in the same order as FC_WEIGHTS_TILE(CT, 1) does. */
#define FC_WEIGHTS_PAIR_TILE(CT)                                                                     \
    static void FC_NAME(dw_pair_##CT)(const FC_T *x, long plane, int in_w, const FC_T *dT, long dt_stride, \
                                      int out_h, int out_w, FC_T *acc_mem, long cstride, long kstride) \
    {                                                                                                \
        VEC a0[CT], a1[CT];                                                                          \
        _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++) {                                      \
            a0[i] = FC_NAME(load)(acc_mem + i * cstride);                                            \
            a1[i] = FC_NAME(load)(acc_mem + kstride + i * cstride);                                  \
        }                                                                                            \
        for (int oh = 0; oh < out_h; oh++) {                                                         \
            const FC_T *xr = x + (long)oh * in_w;                                                    \
            const FC_T *dr = dT + (long)oh * out_w * FC_V;                                           \
            for (int ow = 0; ow < out_w; ow++) {                                                     \
                VEC d0 = FC_NAME(load)(dr + (long)ow * FC_V);                                        \
                VEC d1 = FC_NAME(load)(dr + dt_stride + (long)ow * FC_V);                            \
                _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++) {                              \
                    FC_T v = xr[i * plane + ow];                                                     \
                    a0[i] += d0 * v;                                                                 \
                    a1[i] += d1 * v;                                                                 \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++) {                                      \
            FC_NAME(store)(acc_mem + i * cstride, a0[i]);                                            \
            FC_NAME(store)(acc_mem + kstride + i * cstride, a1[i]);                                  \
        }                                                                                            \
    }

/* Backward-weights and db of one input channel, for one image and one block of count output channels.
   x: the image's padded plane (in_w columns); dT: its dout as (row, column, lane) vectors, rows dt_cols
   vectors apart. acc_mem: the fh * fw taps' sums, FC_V apart; db[0:count] += dT's sums, added in double
   a row at a time. A 3 x 3 filter has its nine taps in one pass over the pixels (one dout vector load for
   nine multiply-adds); other sizes take a pass per tap. */
static void FC_NAME(dw_one_channel)(const FC_T *x, int in_w, const FC_T *dT, int dt_cols, int out_h, int out_w,
                                    int fh, int fw, FC_T *acc_mem, double *db, int count)
{
    FC_NAME(dvec) total = (FC_NAME(dvec)){0};
    if (fh == 3 && fw == 3) {
        VEC acc[9];
        _Pragma("GCC unroll 9") for (int t = 0; t < 9; t++) acc[t] = FC_NAME(load)(acc_mem + t * FC_V);
        for (int oh = 0; oh < out_h; oh++) {
            const FC_T *xr = x + (long)oh * in_w;
            const FC_T *dr = dT + (long)oh * dt_cols * FC_V;
            VEC row = (VEC){0};
            for (int ow = 0; ow < out_w; ow++) {
                VEC d = FC_NAME(load)(dr + (long)ow * FC_V);
                row += d;
                _Pragma("GCC unroll 3") for (int kh = 0; kh < 3; kh++)
                    _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; kw++)
                        acc[kh * 3 + kw] += d * xr[kh * in_w + ow + kw];
            }
            total += __builtin_convertvector(row, FC_NAME(dvec));
        }
        _Pragma("GCC unroll 9") for (int t = 0; t < 9; t++) FC_NAME(store)(acc_mem + t * FC_V, acc[t]);
    } else {
        for (int kh = 0; kh < fh; kh++) {
            for (int kw = 0; kw < fw; kw++) {
                VEC acc = FC_NAME(load)(acc_mem + (kh * fw + kw) * FC_V);
                for (int oh = 0; oh < out_h; oh++)
                    for (int ow = 0; ow < out_w; ow++)
                        acc += FC_NAME(load)(dT + ((long)oh * dt_cols + ow) * FC_V) * x[(long)(oh + kh) * in_w + ow + kw];
                FC_NAME(store)(acc_mem + (kh * fw + kw) * FC_V, acc);
            }
        }
        for (int oh = 0; oh < out_h; oh++) {
            VEC row = (VEC){0};
            for (int ow = 0; ow < out_w; ow++)
                row += FC_NAME(load)(dT + ((long)oh * dt_cols + ow) * FC_V);
            total += __builtin_convertvector(row, FC_NAME(dvec));
        }
    }
    for (int lane = 0; lane < count; lane++)
        db[lane] += total[lane];
}

typedef void (*FC_NAME(tile_fn))(const FC_T *, long, int, int, int, int, const FC_T *, const FC_T *,
                                 FC_T *, long, long);
typedef void (*FC_NAME(dw_fn))(const FC_T *, long, int, const FC_T *, int, int, FC_T *, long);
typedef void (*FC_NAME(pixel_fn))(const FC_T *, long, int, int, int, int, int, int, const FC_T *, const FC_T *,
                                  FC_T *, int, int, int);

#if FC_REGS >= 32
FC_FORWARD_TILE(16, 1)
FC_FORWARD_TILE(8, 3)
FC_FORWARD_TILE(4, 6)
FC_FORWARD_TILE(1, 12)
FC_FORWARD_TILE(12, 2)
FC_FORWARD_TILE(6, 4)
FC_FORWARD_TILE(8, 2)
FC_PIXEL_TILE(4, 6)
FC_PIXEL_TILE(3, 8)
FC_PIXEL_TILE(2, 12)
FC_WEIGHTS_TILE(16, 1)
FC_WEIGHTS_PAIR_TILE(8)
#else
FC_FORWARD_TILE(8, 1)
FC_FORWARD_TILE(4, 2)
FC_FORWARD_TILE(2, 4)
FC_FORWARD_TILE(1, 6)
FC_FORWARD_TILE(6, 2)
FC_PIXEL_TILE(2, 6)
#endif
FC_WEIGHTS_TILE(8, 1)
FC_WEIGHTS_TILE(4, 2)
FC_WEIGHTS_TILE(2, 4)
FC_WEIGHTS_TILE(1, 8)

static FC_NAME(tile_fn) FC_NAME(forward_tile)(int k_tile, int vectors)
{
#if FC_REGS >= 32
    if (k_tile == 16 && vectors == 1) return FC_NAME(tile_16_1);
    if (k_tile == 8 && vectors == 3) return FC_NAME(tile_8_3);
    if (k_tile == 4 && vectors == 6) return FC_NAME(tile_4_6);
    if (k_tile == 1 && vectors == 12) return FC_NAME(tile_1_12);
    if (k_tile == 12 && vectors == 2) return FC_NAME(tile_12_2);
    if (k_tile == 6 && vectors == 4) return FC_NAME(tile_6_4);
    if (k_tile == 8 && vectors == 2) return FC_NAME(tile_8_2);
#else
    if (k_tile == 8 && vectors == 1) return FC_NAME(tile_8_1);
    if (k_tile == 4 && vectors == 2) return FC_NAME(tile_4_2);
    if (k_tile == 2 && vectors == 4) return FC_NAME(tile_2_4);
    if (k_tile == 1 && vectors == 6) return FC_NAME(tile_1_6);
    if (k_tile == 6 && vectors == 2) return FC_NAME(tile_6_2);
#endif
    return 0;
}

static FC_NAME(pixel_fn) FC_NAME(pixel_tile)(int k_vectors, int pixels)
{
#if FC_REGS >= 32
    if (k_vectors == 4 && pixels == 6) return FC_NAME(pixels_4_6);
    if (k_vectors == 3 && pixels == 8) return FC_NAME(pixels_3_8);
    if (k_vectors == 2 && pixels == 12) return FC_NAME(pixels_2_12);
#else
    if (k_vectors == 2 && pixels == 6) return FC_NAME(pixels_2_6);
#endif
    return 0;
}

static FC_NAME(dw_fn) FC_NAME(weights_tile)(int channels)
{
    switch (channels) {
#if FC_REGS >= 32
    case 16: return FC_NAME(dw_16);
#endif
    case 8: return FC_NAME(dw_8);
    case 4: return FC_NAME(dw_4);
    case 2: return FC_NAME(dw_2);
    case 1: return FC_NAME(dw_1);
    default: return 0;
    }
}

/* Source planes (channels, src_h, src_w) into zero-bordered padded planes, and the image's tail zeroed. */
static void FC_NAME(pad_planes)(const fc_tile_pass *p, const FC_T *src, FC_T *dst)
{
    const size_t e = sizeof(FC_T);
    const int right = p->in_w - p->border_w - p->src_w;
    const long below = (long)(p->in_h - p->border_h - p->src_h) * p->in_w;
    for (int c = 0; c < p->in_channels; c++) {
        FC_T *d = dst + c * p->in_plane;
        const FC_T *s = src + (long)c * p->src_h * p->src_w;
        /* the top border and the left border of the first row are one run, as are each row's right
           border and the next row's left border */
        memset(d, 0, ((size_t)p->border_h * p->in_w + p->border_w) * e);
        for (int r = 0; r < p->src_h; r++) {
            FC_T *row = d + (long)(p->border_h + r) * p->in_w + p->border_w;
            FC_NAME(copy_row)(row, s + (long)r * p->src_w, p->src_w);
            for (int i = 0; i < right + (r + 1 < p->src_h ? p->border_w : 0); i++)
                row[p->src_w + i] = 0;
        }
        memset(d + p->in_plane - below, 0, (size_t)below * e);
    }
    long used = p->in_channels * p->in_plane;
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
        const long block_weights = (long)p->in_channels * p->filter_h * p->filter_w * p->k_tile;
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
                    FC_NAME(untranspose_block)(grid + v, p->k_tile, count, pixels, out + (long)first * pixels, pixels);
            }
        }
        return;
    }
    FC_NAME(tile_fn) tile = FC_NAME(forward_tile)(p->k_tile, p->vectors);
    const long block_weights = (long)p->in_channels * p->filter_h * p->filter_w * p->k_tile;
    const long step = (long)p->vectors * FC_V;
    for (int kb = 0; kb < p->k_blocks; kb++) {
        for (int t = 0; t < p->grid_tiles; t++)
            tile(in, p->in_plane, p->in_channels, p->in_w, p->filter_h, p->filter_w, weights + kb * block_weights,
                 bias + kb * p->k_tile, grid, p->grid_stride, t * step);
        for (int i = 0; i < p->k_tile && kb * p->k_tile + i < p->out_channels; i++) {
            FC_T *o = out + (long)(kb * p->k_tile + i) * p->out_h * p->out_w;
            for (int oh = 0; oh < p->out_h; oh++)
                FC_NAME(copy_row)(o + (long)oh * p->out_w, grid + i * p->grid_stride + (long)oh * p->in_w, p->out_w);
        }
    }
}

static void FC_NAME(forward_task_body)(void *arg, int thread)
{
    fc_forward_job *job = arg;
    const fc_tile_pass *p = &job->pass;
    FC_T *grid = FC_NAME(aligned)(job->scratch, job->scratch_stride, thread);
    const long x_image = (long)p->in_channels * p->src_h * p->src_w;
    const long out_image = (long)p->out_channels * p->out_h * p->out_w;
    long n;
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
            const long plane = (long)p->out_h * p->out_w, pooled = (long)(p->out_h / 2) * (p->out_w / 2);
            for (int k = 0; k < p->out_channels; k++)
                _Generic((FC_T)0, float: fc_pool2x2_plane_float, double: fc_pool2x2_plane_double)(
                    out + k * plane, p->out_h, p->out_w, (FC_T *)job->pooled + (n * p->out_channels + k) * pooled,
                    0, p->out_h / 2, p->out_w / 2);
        }
    }
}

/* Backward-weights of one image for output-channel block kb, or blocks kb and kb + 1 together where a
   pair tile exists and the channel tile is wide enough; returns the number of blocks done. */
static int FC_NAME(dw_blocks)(const fc_backward_job *job, const FC_T *x, const FC_T *dT, FC_T *dw, int kb)
{
    const fc_tile_pass *f = &job->forward;
    const int C = f->in_channels, FH = f->filter_h, FW = f->filter_w;
    const long taps = (long)FH * FW, pixels = (long)f->out_h * f->out_w;
    const int pair = FC_REGS >= 32 && kb + 1 < job->w_blocks;
    for (int t = 0; t < job->n_channel_tiles; t++) {
        int c0 = job->channel_tiles[2 * t], count = job->channel_tiles[2 * t + 1];
#if FC_REGS >= 32
        if (pair && count >= 8) {
            for (int c = c0; c < c0 + count; c += 8)
                for (int kh = 0; kh < FH; kh++)
                    for (int kw = 0; kw < FW; kw++)
                        FC_NAME(dw_pair_8)(x + c * f->in_plane + (long)kh * f->in_w + kw, f->in_plane, f->in_w,
                                           dT + (long)kb * pixels * FC_V, pixels * FC_V, f->out_h, f->out_w,
                                           dw + (((long)kb * C + c) * taps + kh * FW + kw) * FC_V, taps * FC_V,
                                           (long)C * taps * FC_V);
            continue;
        }
#endif
        FC_NAME(dw_fn) tile = FC_NAME(weights_tile)(count);
        for (int b = kb; b < kb + 1 + pair; b++)
            for (int kh = 0; kh < FH; kh++)
                for (int kw = 0; kw < FW; kw++)
                    tile(x + c0 * f->in_plane + (long)kh * f->in_w + kw, f->in_plane, f->in_w,
                         dT + (long)b * pixels * FC_V, f->out_h, f->out_w,
                         dw + (((long)b * C + c0) * taps + kh * FW + kw) * FC_V, taps * FC_V);
    }
    return 1 + pair;
}

/* One image's backward with a single input channel: its dout, masked by a fused ReLU's output y (or
   NULL), transposed into the zero-bordered blocks of dTp; dW and db from them; dx (unless NULL) from them
   too. */
static void FC_NAME(backward_one_channel)(const fc_backward_job *job, const FC_T *x, const FC_T *dy, const FC_T *y,
                                          FC_T *dTp, FC_T *dw, double *db, FC_T *dx)
{
    const fc_tile_pass *f = &job->forward;
    const int K = f->out_channels, FH = f->filter_h, FW = f->filter_w;
    const int out_h = f->out_h, out_w = f->out_w, pixels = out_h * out_w;
    const long interior = ((long)(FH - 1 - f->border_h) * job->dt_cols + FW - 1 - f->border_w) * FC_V;
    for (int kb = 0; kb < job->w_blocks; kb++) {
        int count = K - kb * FC_V < FC_V ? K - kb * FC_V : FC_V;
        FC_T *block = dTp + kb * job->dt_block + interior;
        long first = (long)kb * FC_V * pixels;
        FC_NAME(transpose_bordered)(dy + first, y ? y + first : NULL, count, out_h, out_w, block, job->dt_cols);
        FC_NAME(dw_one_channel)(x, f->in_w, block, job->dt_cols, out_h, out_w, FH, FW,
                                dw + (long)kb * FH * FW * FC_V, db + kb * FC_V, count);
    }
    if (dx)
        FC_NAME(dx_one_channel)(dTp, job->dt_block, job->dt_cols, job->w_blocks, job->weights, FH, FW, f->src_h,
                                f->src_w, dx);
}

static void FC_NAME(backward_task_body)(void *arg, int thread)
{
    fc_backward_job *job = arg;
    const fc_tile_pass *f = &job->forward, *d = &job->data;
    const int K = f->out_channels, C = f->in_channels;
    const int pixels = f->out_h * f->out_w;
    FC_T *dT = FC_NAME(aligned)(job->scratch, job->scratch_stride, thread);
    FC_T *grid = dT + (long)job->w_blocks * pixels * FC_V;  /* multiple of FC_V: stays aligned */
    FC_T *padded = grid + d->k_tile * d->grid_stride;
    FC_T *masked = padded + d->image_stride;  /* dout with the ReLU's mask applied */
    FC_T *dTp = dT;  /* the one-channel path's bordered dout instead of all the above */
    if (job->one_channel)
        memset(dTp, 0, (size_t)job->w_blocks * job->dt_block * sizeof(FC_T));
    long g;
    while ((g = fc_next_task(&job->next)) < job->groups) {
        long first = g * job->batch / job->groups, end = (g + 1) * job->batch / job->groups;
        FC_T *dw = (FC_T *)job->dw_groups + g * job->dw_group_elements;
        double *db = job->db_groups + g * K;
        memset(dw, 0, (size_t)job->dw_group_elements * sizeof(FC_T));
        if (!job->one_channel)
            memset(dT, 0, (size_t)job->w_blocks * pixels * FC_V * sizeof(FC_T));
        for (int k = 0; k < K; k++)
            db[k] = 0;
        for (long n = first; n < end; n++) {
            const FC_T *dy = (const FC_T *)job->dout + n * K * pixels;
            const FC_T *y = job->relu_out ? (const FC_T *)job->relu_out + n * K * pixels : NULL;
            const FC_T *x = (const FC_T *)job->packed + n * f->image_stride;
            FC_T *dx = job->dx ? (FC_T *)job->dx + n * (long)C * f->src_h * f->src_w : NULL;
            if (job->one_channel) {
                FC_NAME(backward_one_channel)(job, x, dy, y, dTp, dw, db, dx);
                continue;
            }
            if (y) {  /* the ReLU's backward first, into scratch */
                FC_NAME(relu_gradient)(dy, y, (long)K * pixels, masked);
                dy = masked;
            }
            /* dout as (block, pixel, lane), and db */
            for (int kb = 0; kb < job->w_blocks; kb++) {
                int count = K - kb * FC_V < FC_V ? K - kb * FC_V : FC_V;
                FC_NAME(transpose_bordered)(dy + (long)kb * FC_V * pixels, NULL, count, f->out_h, f->out_w,
                                            dT + (long)kb * pixels * FC_V, f->out_w);
            }
            for (int k = 0; k < K; k++)
                db[k] += FC_NAME(row_sum)(dy + (long)k * pixels, pixels);
            for (int kb = 0; kb < job->w_blocks; kb += FC_NAME(dw_blocks)(job, x, dT, dw, kb))
                ;
            if (dx) {
                FC_NAME(pad_planes)(d, dy, padded);
                FC_NAME(run_pass)(d, padded, job->weights, job->zeros, grid, dx);
            }
        }
    }
}

static void FC_NAME(sum_groups_task_body)(void *arg, int thread)
{
    fc_backward_job *job = arg;
    const fc_tile_pass *f = &job->forward;
    const int K = f->out_channels, C = f->in_channels;
    const long taps = (long)f->filter_h * f->filter_w;
    const FC_T *groups = job->dw_groups;
    FC_T *dw = job->dw;
    long row;
    (void)thread;
    while ((row = fc_next_task(&job->next)) < (long)job->w_blocks * C) {
        int kb = row / C, c = row % C;
        for (long tap = 0; tap < taps; tap++) {
            /* the lanes' sums in group order, a vector at a time */
            const FC_T *src = groups + (row * taps + tap) * FC_V;
            VEC sum = FC_NAME(load)(src);
            for (int g = 1; g < job->groups; g++)
                sum += FC_NAME(load)(src + g * job->dw_group_elements);
            for (int lane = 0; lane < FC_V && kb * FC_V + lane < K; lane++)
                dw[(((long)kb * FC_V + lane) * C + c) * taps + tap] = sum[lane];
        }
    }
}

/* The tasks as the thread pool runs them: subnormals flushed while they run (see dconv.h). */
#define FC_FLUSHING_TASK(TASK)                                                                       \
    static void FC_NAME(TASK)(void *arg, int thread)                                                 \
    {                                                                                                \
        unsigned fp = fc_flush_subnormals();                                                         \
        FC_NAME(TASK##_body)(arg, thread);                                                           \
        fc_restore_fp(fp);                                                                           \
    }
FC_FLUSHING_TASK(forward_task)
FC_FLUSHING_TASK(backward_task)
FC_FLUSHING_TASK(sum_groups_task)
#undef FC_FLUSHING_TASK

static int FC_NAME(has_tile)(int channel_lanes, int k_tile, int vectors)
{
    if (channel_lanes)
        return k_tile % FC_V == 0 && FC_NAME(pixel_tile)(k_tile / FC_V, vectors) != 0;
    return FC_NAME(forward_tile)(k_tile, vectors) != 0;
}

static const fc_dconv_functions_t FC_NAME(functions) = {
    FC_NAME(forward_task), FC_NAME(backward_task), FC_NAME(sum_groups_task), FC_NAME(has_tile)};

#undef VEC
