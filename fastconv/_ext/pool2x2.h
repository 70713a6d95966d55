/* Max pooling of one plane over 2 x 2 windows with stride 2 and no padding (the book's pooling), a
 * vector of outputs at a time: the rows' even and odd columns are split with shuffles and the four
 * cells compared in (ky, kx) order, strictly, so the first maximum wins ties. A vector holding a NaN,
 * and the last outputs of a row, go through the exact scalar loop (the first NaN wins, as in
 * numpy.argmax). source receives each maximum's flat index y * W + x in the plane; with source NULL
 * only the maxima are computed.
 * Baseline vectors (16 bytes); without GCC's shuffles, everything takes the scalar loop.
 */
#ifndef FASTCONV_POOL2X2_H
#define FASTCONV_POOL2X2_H

#define FC_POOL2X2_SCALAR(T)                                                                        \
    static inline void fc_pool2x2_cell_##T(const T *x, int W, int oh, int ow, T *out, int *source)  \
    {                                                                                               \
        int cell = 2 * oh * W + 2 * ow;                                                             \
        const int offsets[4] = {0, 1, W, W + 1};                                                    \
        T best = x[cell];                                                                           \
        int best_cell = cell;                                                                       \
        for (int i = 1; i < 4; i++) {                                                               \
            T v = x[cell + offsets[i]];                                                             \
            if (v > best || (v != v && best == best)) {                                             \
                best = v;                                                                           \
                best_cell = cell + offsets[i];                                                      \
            }                                                                                       \
        }                                                                                           \
        *out = best;                                                                                \
        *source = best_cell;                                                                        \
    }

FC_POOL2X2_SCALAR(float)
FC_POOL2X2_SCALAR(double)

#if defined(__GNUC__) && !defined(__clang__)
#define FC_POOL2X2_VECTOR(T, I, V, EVEN, ODD, LANES)                                                \
    typedef T fc_pool_vec_##T __attribute__((vector_size(16)));                                     \
    typedef I fc_pool_ivec_##T __attribute__((vector_size(16)));                                    \
    static void fc_pool2x2_plane_##T(const T *x, int H, int W, T *out, int *source, int out_h,      \
                                     int out_w)                                                     \
    {                                                                                               \
        (void)H;                                                                                    \
        const fc_pool_ivec_##T even = EVEN, odd = ODD, lanes = LANES;                               \
        for (int oh = 0; oh < out_h; oh++) {                                                        \
            const T *r0 = x + (long)2 * oh * W, *r1 = r0 + W;                                       \
            T *o = out + (long)oh * out_w;                                                          \
            int *s = source ? source + (long)oh * out_w : 0;                                        \
            int unused;                                                                             \
            int ow = 0;                                                                             \
            for (; ow + V <= out_w; ow += V) {                                                      \
                fc_pool_vec_##T p0, p1, q0, q1;                                                     \
                __builtin_memcpy(&p0, r0 + 2 * ow, 16);                                             \
                __builtin_memcpy(&p1, r0 + 2 * ow + V, 16);                                         \
                __builtin_memcpy(&q0, r1 + 2 * ow, 16);                                             \
                __builtin_memcpy(&q1, r1 + 2 * ow + V, 16);                                         \
                fc_pool_vec_##T a = __builtin_shuffle(p0, p1, even), b = __builtin_shuffle(p0, p1, odd); \
                fc_pool_vec_##T c = __builtin_shuffle(q0, q1, even), d = __builtin_shuffle(q0, q1, odd); \
                fc_pool_ivec_##T nan = (a != a) | (b != b) | (c != c) | (d != d);                   \
                I any = 0;                                                                          \
                for (int j = 0; j < V; j++)                                                         \
                    any |= nan[j];                                                                  \
                if (any) {                                                                          \
                    for (int j = 0; j < V; j++)                                                     \
                        fc_pool2x2_cell_##T(x, W, oh, ow + j, o + ow + j, s ? s + ow + j : &unused); \
                    continue;                                                                       \
                }                                                                                   \
                fc_pool_vec_##T best = a;                                                           \
                fc_pool_ivec_##T offset = (fc_pool_ivec_##T){0};                                    \
                fc_pool_ivec_##T m = b > best;                                                      \
                best = (fc_pool_vec_##T)(((fc_pool_ivec_##T)b & m) | ((fc_pool_ivec_##T)best & ~m)); \
                offset = (m & 1) | (offset & ~m);                                                   \
                m = c > best;                                                                       \
                best = (fc_pool_vec_##T)(((fc_pool_ivec_##T)c & m) | ((fc_pool_ivec_##T)best & ~m)); \
                offset = (m & (I)W) | (offset & ~m);                                                \
                m = d > best;                                                                       \
                best = (fc_pool_vec_##T)(((fc_pool_ivec_##T)d & m) | ((fc_pool_ivec_##T)best & ~m)); \
                offset = (m & (I)(W + 1)) | (offset & ~m);                                          \
                __builtin_memcpy(o + ow, &best, 16);                                                \
                if (!s) /* the maxima alone */                                                      \
                    continue;                                                                       \
                fc_pool_ivec_##T cell = offset + (I)(2 * oh * W + 2 * ow) + 2 * lanes;              \
                for (int j = 0; j < V; j++)                                                         \
                    s[ow + j] = (int)cell[j];                                                       \
            }                                                                                       \
            for (; ow < out_w; ow++)                                                                \
                fc_pool2x2_cell_##T(x, W, oh, ow, o + ow, s ? s + ow : &unused);                    \
        }                                                                                           \
    }
FC_POOL2X2_VECTOR(float, int, 4, ((fc_pool_ivec_float){0, 2, 4, 6}), ((fc_pool_ivec_float){1, 3, 5, 7}),
                  ((fc_pool_ivec_float){0, 1, 2, 3}))
FC_POOL2X2_VECTOR(double, long long, 2, ((fc_pool_ivec_double){0, 2}), ((fc_pool_ivec_double){1, 3}),
                  ((fc_pool_ivec_double){0, 1}))
#else
#define FC_POOL2X2_PLANE(T)                                                                         \
    static void fc_pool2x2_plane_##T(const T *x, int H, int W, T *out, int *source, int out_h,      \
                                     int out_w)                                                     \
    {                                                                                               \
        (void)H;                                                                                    \
        int unused; /* the index of each maximum, when source is NULL */                            \
        for (int oh = 0; oh < out_h; oh++)                                                          \
            for (int ow = 0; ow < out_w; ow++)                                                      \
                fc_pool2x2_cell_##T(x, W, oh, ow, out + (long)oh * out_w + ow,                      \
                                    source ? source + (long)oh * out_w + ow : &unused);             \
    }
FC_POOL2X2_PLANE(float)
FC_POOL2X2_PLANE(double)
#endif

#endif
