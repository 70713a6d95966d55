/* Vector utilities of the direct-convolution kernels, for one element type and one vector width: loads
 * and stores, the ReLU's masks (fc_relu_off, dconv.h), transposes between (channel, pixel) rows and
 * (pixel, lane) vectors, and sums of lanes.
 *
 * Included by dconv_variant.h, once per element type, with
 *   FC_T      element type (float or double)
 *   FC_I      the integer type of its size (int or long long)
 *   FC_V      lanes of one vector
 *   FC_NAME   FC_NAME(x): x with the variant's and type's suffix
 * The vectors are GCC/Clang vector extensions: the variant file's target pragma makes them AVX-512, AVX2
 * or baseline SIMD. VEC, defined here, is undefined by dconv_variant.h after the type's kernels.
 */
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

static inline FC_T *FC_NAME(aligned)(void *scratch, ptrdiff_t stride, int thread)
{
    /* each thread's region starts on an FC_SCRATCH_ALIGNMENT boundary (the caller leaves room for it) */
    uintptr_t p = (uintptr_t)((FC_T *)scratch + (ptrdiff_t)thread * stride);
    return (FC_T *)((p + FC_SCRATCH_ALIGNMENT - 1) & ~(uintptr_t)(FC_SCRATCH_ALIGNMENT - 1));
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

/* v with zeros where the ReLU is off at y (fc_relu_off) */
static inline VEC FC_NAME(zero_where_not_positive)(VEC v, VEC y)
{
    return (VEC)((FC_NAME(lanemask))v & ~(FC_NAME(lanemask))fc_relu_off(y));
}

/* ReLU of values[0:n], in place: the forward epilogue of a convolution followed by a ReLU. */
static void FC_NAME(relu_in_place)(FC_T *values, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + FC_V <= n; i += FC_V) {
        VEC v = FC_NAME(load)(values + i);
        FC_NAME(store)(values + i, FC_NAME(zero_where_not_positive)(v, v));
    }
    for (; i < n; i++)
        values[i] = fc_relu_off(values[i]) ? 0 : values[i];
}

/* dst = dy with zeros where the ReLU is off at the forward's ReLU output y: the ReLU's backward, on one
   image. */
static void FC_NAME(relu_gradient)(const FC_T *dy, const FC_T *y, ptrdiff_t n, FC_T *dst)
{
    ptrdiff_t i = 0;
    for (; i + FC_V <= n; i += FC_V)
        FC_NAME(store)(dst + i, FC_NAME(zero_where_not_positive)(FC_NAME(load)(dy + i), FC_NAME(load)(y + i)));
    for (; i < n; i++)
        dst[i] = fc_relu_off(y[i]) ? 0 : dy[i];
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
   order), with zeros where the ReLU is off at y (a fused ReLU's output, or NULL). FC_V x FC_V squares are transposed
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
                    r[i] = FC_NAME(zero_where_not_positive)(FC_NAME(load)(dy + (ptrdiff_t)i * pixels + q0),
                                                            FC_NAME(load)(y + (ptrdiff_t)i * pixels + q0));
            } else {
                _Pragma("GCC unroll 16") for (int i = 0; i < FC_V; i++)
                    r[i] = FC_NAME(load)(dy + (ptrdiff_t)i * pixels + q0);
            }
            FC_NAME(transpose_registers)(r);
            _Pragma("GCC unroll 16") for (int j = 0; j < FC_V; j++) {
                FC_NAME(store)(dst + ((ptrdiff_t)oh * dt_cols + ow) * FC_V, r[j]);
                if (++ow == out_w) {
                    ow = 0;
                    oh++;
                }
            }
        }
    }
#endif
    for (int q = q0; q < pixels; q++) {
        FC_T *d = dst + ((ptrdiff_t)(q / out_w) * dt_cols + q % out_w) * FC_V;
        for (int i = 0; i < count; i++)
            d[i] = y && fc_relu_off(y[(ptrdiff_t)i * pixels + q]) ? 0 : dy[(ptrdiff_t)i * pixels + q];
    }
}

/* The opposite of transpose_bordered with dt_cols = out_w: rows[j * row_stride + q] = T[q * t_stride + j] for j < count (channels)
   and q < pixels. */
static void FC_NAME(untranspose_block)(const FC_T *T, ptrdiff_t t_stride, int count, int pixels, FC_T *rows,
                                       ptrdiff_t row_stride)
{
    int q0 = 0;
#if defined(__GNUC__) && !defined(__clang__)
    for (; q0 + FC_V <= pixels; q0 += FC_V) {
        VEC r[FC_V];
        _Pragma("GCC unroll 16") for (int i = 0; i < FC_V; i++)
            r[i] = FC_NAME(load)(T + (ptrdiff_t)(q0 + i) * t_stride);
        FC_NAME(transpose_registers)(r);
        for (int j = 0; j < count; j++)
            FC_NAME(store)(rows + (ptrdiff_t)j * row_stride + q0, r[j]);
    }
#endif
    for (int j = 0; j < count; j++)
        for (int q = q0; q < pixels; q++)
            rows[(ptrdiff_t)j * row_stride + q] = T[(ptrdiff_t)q * t_stride + j];
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
