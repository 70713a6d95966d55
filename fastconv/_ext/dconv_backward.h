/* Backward kernels of the direct convolution, for one element type and one vector width: the
 * backward-weights tiles of dconv_tiles.h (single and paired), the one-input-channel path, the backward
 * task (dW, db and dx of a group of images) and the sum of the groups. Included by dconv_variant.h after
 * dconv_forward.h, whose run_pass computes dx. The algorithm and the meaning of every size are described
 * in fastconv/_plan.py.
 */

/* Backward-weights tile: CT input channels for one tap and one block of FC_V output channels,
   summed over the pixels of one image into acc_mem (channel i at acc_mem + i * cstride).
   x: channel 0 of the tile, already moved by the tap; dT: the image's dout, (pixels, FC_V).
   With few channels, U interleaved partial sums (pixel ow goes to sum ow % U) keep enough
   independent multiply-adds in flight; they are added in order at the end. */
#define FC_WEIGHTS_TILE(CT, U)                                                                       \
    static void FC_NAME(dw_##CT)(const FC_T *x, ptrdiff_t plane, int in_w, const FC_T *dT,           \
                                 int out_h, int out_w, FC_T *acc_mem, ptrdiff_t cstride)             \
    {                                                                                                \
        VEC acc[U][CT];                                                                              \
        _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++) {                                      \
            acc[0][i] = FC_NAME(load)(acc_mem + i * cstride);                                        \
            _Pragma("GCC unroll 8") for (int u = 1; u < U; u++) acc[u][i] = (VEC){0};                \
        }                                                                                            \
        const int whole = out_w - out_w % U;                                                         \
        for (int oh = 0; oh < out_h; oh++) {                                                         \
            const FC_T *xr = x + (ptrdiff_t)oh * in_w;                                               \
            const FC_T *dr = dT + (ptrdiff_t)oh * out_w * FC_V;                                      \
            for (int ow = 0; ow < whole; ow += U) {                                                  \
                _Pragma("GCC unroll 8") for (int u = 0; u < U; u++) {                                \
                    VEC d = FC_NAME(load)(dr + (ptrdiff_t)(ow + u) * FC_V);                          \
                    _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++)                            \
                        acc[u][i] += d * xr[i * plane + ow + u];                                     \
                }                                                                                    \
            }                                                                                        \
            for (int ow = whole; ow < out_w; ow++) {                                                 \
                VEC d = FC_NAME(load)(dr + (ptrdiff_t)ow * FC_V);                                    \
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
   block dt_stride and kstride elements after the first's): each x value loaded feeds two multiply-adds.
   Every accumulator adds the same products in the same order, into the same U partial sums, as
   FC_WEIGHTS_TILE(CT, U) does. */
#define FC_WEIGHTS_PAIR_TILE(CT, U)                                                                  \
    static void FC_NAME(dw_pair_##CT)(const FC_T *x, ptrdiff_t plane, int in_w, const FC_T *dT,      \
                                      ptrdiff_t dt_stride, int out_h, int out_w, FC_T *acc_mem,      \
                                      ptrdiff_t cstride, ptrdiff_t kstride)                          \
    {                                                                                                \
        VEC a0[U][CT], a1[U][CT];                                                                    \
        _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++) {                                      \
            a0[0][i] = FC_NAME(load)(acc_mem + i * cstride);                                         \
            a1[0][i] = FC_NAME(load)(acc_mem + kstride + i * cstride);                               \
            _Pragma("GCC unroll 8") for (int u = 1; u < U; u++) a0[u][i] = a1[u][i] = (VEC){0};      \
        }                                                                                            \
        const int whole = out_w - out_w % U;                                                         \
        for (int oh = 0; oh < out_h; oh++) {                                                         \
            const FC_T *xr = x + (ptrdiff_t)oh * in_w;                                               \
            const FC_T *dr = dT + (ptrdiff_t)oh * out_w * FC_V;                                      \
            for (int ow = 0; ow < whole; ow += U) {                                                  \
                _Pragma("GCC unroll 8") for (int u = 0; u < U; u++) {                                \
                    VEC d0 = FC_NAME(load)(dr + (ptrdiff_t)(ow + u) * FC_V);                         \
                    VEC d1 = FC_NAME(load)(dr + dt_stride + (ptrdiff_t)(ow + u) * FC_V);             \
                    _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++) {                          \
                        FC_T v = xr[i * plane + ow + u];                                             \
                        a0[u][i] += d0 * v;                                                          \
                        a1[u][i] += d1 * v;                                                          \
                    }                                                                                \
                }                                                                                    \
            }                                                                                        \
            for (int ow = whole; ow < out_w; ow++) {                                                 \
                VEC d0 = FC_NAME(load)(dr + (ptrdiff_t)ow * FC_V);                                   \
                VEC d1 = FC_NAME(load)(dr + dt_stride + (ptrdiff_t)ow * FC_V);                       \
                _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++) {                              \
                    FC_T v = xr[i * plane + ow];                                                     \
                    a0[ow % U][i] += d0 * v;                                                         \
                    a1[ow % U][i] += d1 * v;                                                         \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        _Pragma("GCC unroll 16") for (int i = 0; i < CT; i++) {                                      \
            VEC s0 = a0[0][i], s1 = a1[0][i];                                                        \
            _Pragma("GCC unroll 8") for (int u = 1; u < U; u++) {                                    \
                s0 += a0[u][i];                                                                      \
                s1 += a1[u][i];                                                                      \
            }                                                                                        \
            FC_NAME(store)(acc_mem + i * cstride, s0);                                               \
            FC_NAME(store)(acc_mem + kstride + i * cstride, s1);                                     \
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
            const FC_T *xr = x + (ptrdiff_t)oh * in_w;
            const FC_T *dr = dT + (ptrdiff_t)oh * dt_cols * FC_V;
            VEC row = (VEC){0};
            for (int ow = 0; ow < out_w; ow++) {
                VEC d = FC_NAME(load)(dr + (ptrdiff_t)ow * FC_V);
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
                        acc += FC_NAME(load)(dT + ((ptrdiff_t)oh * dt_cols + ow) * FC_V)
                               * x[(ptrdiff_t)(oh + kh) * in_w + ow + kw];
                FC_NAME(store)(acc_mem + (kh * fw + kw) * FC_V, acc);
            }
        }
        for (int oh = 0; oh < out_h; oh++) {
            VEC row = (VEC){0};
            for (int ow = 0; ow < out_w; ow++)
                row += FC_NAME(load)(dT + ((ptrdiff_t)oh * dt_cols + ow) * FC_V);
            total += __builtin_convertvector(row, FC_NAME(dvec));
        }
    }
    for (int lane = 0; lane < count; lane++)
        db[lane] += total[lane];
}

/* dx of a single-channel input, (H, W), from the image's dout in (row, column, lane) order with a zero
   border of FH - 1 - pad rows and FW - 1 - pad columns (dTp, blocks of dt_block elements), and the
   weights as (block, FH, FW, lane) vectors: each dx value is a sum over taps of dout vectors times
   weight vectors, whose lanes are added FC_V values at a time. */
static void FC_NAME(dx_one_channel)(const FC_T *dTp, ptrdiff_t dt_block, int dt_cols, int w_blocks, const FC_T *wv,
                                    int fh, int fw, int H, int W, FC_T *dx)
{
    for (int ih = 0; ih < H; ih++) {
        for (int iw0 = 0; iw0 < W; iw0 += FC_V) {
            VEC acc[FC_V];
            _Pragma("GCC unroll 16") for (int j = 0; j < FC_V; j++) acc[j] = (VEC){0};
            for (int kb = 0; kb < w_blocks; kb++) {
                for (int kh = 0; kh < fh; kh++) {
                    for (int kw = 0; kw < fw; kw++) {
                        VEC w = FC_NAME(load)(wv + ((ptrdiff_t)(kb * fh + kh) * fw + kw) * FC_V);
                        const FC_T *src = dTp + kb * dt_block
                                          + ((ptrdiff_t)(ih + fh - 1 - kh) * dt_cols + iw0 + fw - 1 - kw) * FC_V;
                        _Pragma("GCC unroll 16") for (int j = 0; j < FC_V; j++)
                            acc[j] += FC_NAME(load)(src + (ptrdiff_t)j * FC_V) * w;
                    }
                }
            }
            FC_NAME(lane_sums)(acc, dx + (ptrdiff_t)ih * W + iw0, W - iw0 < FC_V ? W - iw0 : FC_V);
        }
    }
}

typedef void (*FC_NAME(dw_fn))(const FC_T *, ptrdiff_t, int, const FC_T *, int, int, FC_T *, ptrdiff_t);
typedef void (*FC_NAME(dw_pair_fn))(const FC_T *, ptrdiff_t, int, const FC_T *, ptrdiff_t, int, int, FC_T *, ptrdiff_t,
                                    ptrdiff_t);

#define FC_SINGLE(CT, U, PAIRED) FC_WEIGHTS_TILE(CT, U)
#define FC_PAIR(CT, U, PAIRED) FC_WHEN(PAIRED, FC_WEIGHTS_PAIR_TILE)(CT, U)
FC_TILES(CHANNEL)(FC_SINGLE)
FC_TILES(CHANNEL)(FC_PAIR)
#undef FC_SINGLE
#undef FC_PAIR

/* The compiled backward-weights tile of this many channels, or NULL. */
static FC_NAME(dw_fn) FC_NAME(weights_tile)(int channels)
{
#define FC_CASE(CT, U, PAIRED) if (channels == CT) return FC_NAME(dw_##CT);
    FC_TILES(CHANNEL)(FC_CASE)
#undef FC_CASE
    return 0;
}

/* The compiled tile of this many channels for two blocks of output channels at once, or NULL. */
static FC_NAME(dw_pair_fn) FC_NAME(weights_pair_tile)(int channels)
{
#define FC_RETURN(CT, U) return FC_NAME(dw_pair_##CT);
#define FC_CASE(CT, U, PAIRED) if (channels == CT) { FC_WHEN(PAIRED, FC_RETURN)(CT, U) }
    FC_TILES(CHANNEL)(FC_CASE)
#undef FC_CASE
#undef FC_RETURN
    return 0;
}

static int FC_NAME(has_weights_tile)(int channels, int paired)
{
    return paired ? FC_NAME(weights_pair_tile)(channels) != 0 : FC_NAME(weights_tile)(channels) != 0;
}

/* Backward-weights of one image for output-channel block kb, or, where the plan pairs blocks
   (job->pair_blocks), blocks kb and kb + 1 together through the pair tiles while both exist; returns the
   number of blocks done. */
static int FC_NAME(dw_blocks)(const fc_backward_job *job, const FC_T *x, const FC_T *dT, FC_T *dw, int kb)
{
    const fc_tile_pass *f = &job->forward;
    const int C = f->in_channels, FH = f->filter_h, FW = f->filter_w;
    const ptrdiff_t taps = (ptrdiff_t)FH * FW, pixels = (ptrdiff_t)f->out_h * f->out_w;
    const int pair = job->pair_blocks && kb + 1 < job->w_blocks;
    const FC_T *dTk = dT + (ptrdiff_t)kb * pixels * FC_V;
    for (int t = 0; t < job->n_channel_tiles; t++) {
        int c0 = job->channel_tiles[2 * t], count = job->channel_tiles[2 * t + 1];
        const FC_T *xc = x + c0 * f->in_plane;
        FC_T *acc = dw + ((ptrdiff_t)kb * C + c0) * taps * FC_V;
        if (pair) {
            FC_NAME(dw_pair_fn) tile = FC_NAME(weights_pair_tile)(count);
            for (int kh = 0; kh < FH; kh++)
                for (int kw = 0; kw < FW; kw++)
                    tile(xc + (ptrdiff_t)kh * f->in_w + kw, f->in_plane, f->in_w, dTk, pixels * FC_V, f->out_h,
                         f->out_w, acc + (kh * FW + kw) * FC_V, taps * FC_V, (ptrdiff_t)C * taps * FC_V);
        } else {
            FC_NAME(dw_fn) tile = FC_NAME(weights_tile)(count);
            for (int kh = 0; kh < FH; kh++)
                for (int kw = 0; kw < FW; kw++)
                    tile(xc + (ptrdiff_t)kh * f->in_w + kw, f->in_plane, f->in_w, dTk, f->out_h, f->out_w,
                         acc + (kh * FW + kw) * FC_V, taps * FC_V);
        }
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
    const ptrdiff_t interior = ((ptrdiff_t)(FH - 1 - f->border_h) * job->dt_cols + FW - 1 - f->border_w) * FC_V;
    for (int kb = 0; kb < job->w_blocks; kb++) {
        int count = K - kb * FC_V < FC_V ? K - kb * FC_V : FC_V;
        FC_T *block = dTp + kb * job->dt_block + interior;
        ptrdiff_t first = (ptrdiff_t)kb * FC_V * pixels;
        FC_NAME(transpose_bordered)(dy + first, y ? y + first : NULL, count, out_h, out_w, block, job->dt_cols);
        FC_NAME(dw_one_channel)(x, f->in_w, block, job->dt_cols, out_h, out_w, FH, FW,
                                dw + (ptrdiff_t)kb * FH * FW * FC_V, db + kb * FC_V, count);
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
    /* the plan's backward buffers: transposed dout (with one input channel, its bordered blocks, and
       nothing else), then the dx pass's grid (right after the transposed vectors, so it stays aligned),
       its padded planes, and dout with the ReLU's mask applied */
    FC_T *dT = FC_NAME(aligned)(job->scratch, job->scratch_stride, thread);
    FC_T *grid = dT + job->transposed;
    FC_T *padded = grid + job->grid;
    FC_T *masked = padded + job->planes;
    FC_T *dTp = dT;  /* the one-channel path's bordered dout */
    if (job->one_channel)
        memset(dTp, 0, (size_t)job->transposed * sizeof(FC_T));
    ptrdiff_t g;
    while ((g = fc_next_task(&job->next)) < job->groups) {
        ptrdiff_t first = g * job->batch / job->groups, end = (g + 1) * job->batch / job->groups;
        FC_T *dw = (FC_T *)job->dw_groups + g * job->dw_group_elements;
        double *db = job->db_groups + g * K;
        memset(dw, 0, (size_t)job->dw_group_elements * sizeof(FC_T));
        if (!job->one_channel)
            memset(dT, 0, (size_t)job->transposed * sizeof(FC_T));
        for (int k = 0; k < K; k++)
            db[k] = 0;
        for (ptrdiff_t n = first; n < end; n++) {
            const FC_T *dy = (const FC_T *)job->dout + n * K * pixels;
            const FC_T *y = job->relu_out ? (const FC_T *)job->relu_out + n * K * pixels : NULL;
            const FC_T *x = (const FC_T *)job->packed + n * f->image_stride;
            FC_T *dx = job->dx ? (FC_T *)job->dx + n * (ptrdiff_t)C * f->src_h * f->src_w : NULL;
            if (job->one_channel) {
                FC_NAME(backward_one_channel)(job, x, dy, y, dTp, dw, db, dx);
                continue;
            }
            if (y) {  /* the ReLU's backward first, into scratch */
                FC_NAME(relu_gradient)(dy, y, (ptrdiff_t)K * pixels, masked);
                dy = masked;
            }
            /* dout as (block, pixel, lane), and db */
            for (int kb = 0; kb < job->w_blocks; kb++) {
                int count = K - kb * FC_V < FC_V ? K - kb * FC_V : FC_V;
                FC_NAME(transpose_bordered)(dy + (ptrdiff_t)kb * FC_V * pixels, NULL, count, f->out_h, f->out_w,
                                            dT + (ptrdiff_t)kb * pixels * FC_V, f->out_w);
            }
            for (int k = 0; k < K; k++)
                db[k] += FC_NAME(row_sum)(dy + (ptrdiff_t)k * pixels, pixels);
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
    const ptrdiff_t taps = (ptrdiff_t)f->filter_h * f->filter_w;
    const FC_T *groups = job->dw_groups;
    FC_T *dw = job->dw;
    ptrdiff_t row;
    (void)thread;
    while ((row = fc_next_task(&job->next)) < (ptrdiff_t)job->w_blocks * C) {
        int kb = row / C, c = row % C;
        for (ptrdiff_t tap = 0; tap < taps; tap++) {
            /* the lanes' sums in group order, a vector at a time */
            const FC_T *src = groups + (row * taps + tap) * FC_V;
            VEC sum = FC_NAME(load)(src);
            for (int g = 1; g < job->groups; g++)
                sum += FC_NAME(load)(src + g * job->dw_group_elements);
            for (int lane = 0; lane < FC_V && kb * FC_V + lane < K; lane++)
                dw[(((ptrdiff_t)kb * FC_V + lane) * C + c) * taps + tap] = sum[lane];
        }
    }
}

FC_FLUSHING_TASK(backward_task)
FC_FLUSHING_TASK(sum_groups_task)
