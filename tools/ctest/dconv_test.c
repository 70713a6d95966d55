/* The direct-convolution kernels and the thread pool of fastconv/_ext, tested from C, without Python:
 * for cross-compiled targets (AArch64 under qemu-user, Windows under Wine) where the package cannot be
 * installed as quickly. tools/ctest/run.sh builds and runs it.
 *
 * For every variant the CPU runs, float and double, several geometries and every forward tile the
 * variant is compiled for (grid tiles and channels-in-lanes tiles, as the backward-data tile too), it
 * runs forward (plain, with a fused ReLU, and pooled), backward (dx, dW, db, after a fused ReLU too) and
 * checks them against a direct double-precision reference on integer data, whose sums are exact: the
 * results must be equal, and equal on 1 and 3 threads. The sizes, tiles and buffers are laid out as
 * fastconv/_plan.py lays them out. It then checks that subnormal numbers are flushed inside the kernels
 * and that every thread's floating-point control register is as it was afterwards, and runs the pool
 * through many short runs, polling and sleeping, and from two threads at once.
 *
 * Prints one line per check group and "dconv_test: ok" at the end; exits 1 at the first failure.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dconv.h"

#if defined(_WIN32)
#include <windows.h>
#else
#include <pthread.h>
#endif

#define CHECK(cond, ...)                                                                             \
    do {                                                                                             \
        if (!(cond)) {                                                                               \
            printf("FAILED %s:%d: ", __FILE__, __LINE__);                                            \
            printf(__VA_ARGS__);                                                                     \
            printf("\n");                                                                            \
            exit(1);                                                                                 \
        }                                                                                            \
    } while (0)

/* ---- arrays of float or double ---- */
typedef struct {
    int dbl;
    size_t n;
    void *p;
} arr;

/* Zeroed memory; on Windows at the top of the address space, above 4 GiB, as 64-bit Windows places
   memory: a pointer kept in a 32-bit long there loses its upper half. */
static void *alloc_zeroed(size_t bytes)
{
#if defined(_WIN32)
    void *p = VirtualAlloc(NULL, bytes ? bytes : 1, MEM_COMMIT | MEM_RESERVE | MEM_TOP_DOWN, PAGE_READWRITE);
#else
    void *p = calloc(bytes ? bytes : 1, 1);
#endif
    CHECK(p, "out of memory");
    return p;
}

static void release(void *p)
{
#if defined(_WIN32)
    if (p)
        VirtualFree(p, 0, MEM_RELEASE);
#else
    free(p);
#endif
}

static arr make(int dbl, size_t n)
{
    arr a = {dbl, n, alloc_zeroed(n * (dbl ? sizeof(double) : sizeof(float)))};
    return a;
}
static double get(arr a, size_t i) { return a.dbl ? ((double *)a.p)[i] : ((float *)a.p)[i]; }
static void put(arr a, size_t i, double v)
{
    if (a.dbl)
        ((double *)a.p)[i] = v;
    else
        ((float *)a.p)[i] = (float)v;
}
static void fill(arr a, double v)
{
    for (size_t i = 0; i < a.n; i++)
        put(a, i, v);
}

static uint32_t rng_state = 12345;
static int draw(int lo, int hi) /* uniform integer in [lo, hi] */
{
    rng_state = rng_state * 1664525u + 1013904223u;
    return lo + (int)((rng_state >> 8) % (uint32_t)(hi - lo + 1));
}

static long ceil_div(long a, long b) { return (a + b - 1) / b; }

/* ---- the plan, as fastconv/_plan.py makes it ---- */
static fc_tile_pass tile_pass(int in_channels, int out_channels, int src_h, int src_w, int border_h, int border_w,
                              int fh, int fw, int lanes, int k_tile, int vectors, int channel_lanes, int c_chunk)
{
    fc_tile_pass t;
    memset(&t, 0, sizeof t);
    t.in_channels = in_channels, t.out_channels = out_channels;
    t.src_h = src_h, t.src_w = src_w, t.border_h = border_h, t.border_w = border_w;
    t.in_h = src_h + 2 * border_h, t.in_w = src_w + 2 * border_w;
    t.out_h = t.in_h - fh + 1, t.out_w = t.in_w - fw + 1;
    t.filter_h = fh, t.filter_w = fw;
    t.k_tile = k_tile, t.vectors = vectors, t.channel_lanes = channel_lanes;
    t.c_chunk = c_chunk < in_channels ? c_chunk : in_channels;
    const long grid = (long)t.out_h * t.in_w;
    t.grid_tiles = (int)(channel_lanes ? ceil_div((long)t.out_h * t.out_w, vectors)
                                       : ceil_div(grid, (long)vectors * lanes));
    t.grid_stride = channel_lanes ? (long)t.grid_tiles * vectors : (long)t.grid_tiles * vectors * lanes;
    long tail = channel_lanes ? 0 : t.grid_stride - grid + (lanes > t.in_w - t.out_w ? lanes : t.in_w - t.out_w);
    t.k_blocks = (int)ceil_div(out_channels, k_tile);
    t.in_plane = (long)t.in_h * t.in_w;
    t.image_stride = in_channels * t.in_plane + tail;
    return t;
}

/* (K, C, FH, FW) weights as (blocks, C, FH, FW, k_tile); for backward-data, transposed (K <-> C) and flipped */
static arr pack(arr w, int K, int C, int fh, int fw, int k_tile, int backward_data)
{
    const int outs = backward_data ? C : K, ins = backward_data ? K : C, taps = fh * fw;
    const int blocks = (int)ceil_div(outs, k_tile);
    arr p = make(w.dbl, (size_t)blocks * k_tile * ins * taps);
    size_t at = 0;
    for (int b = 0; b < blocks; b++)
        for (int i = 0; i < ins; i++)
            for (int tap = 0; tap < taps; tap++)
                for (int t = 0; t < k_tile; t++, at++) {
                    int o = b * k_tile + t;
                    if (o >= outs)
                        put(p, at, 0);
                    else if (backward_data)
                        put(p, at, get(w, ((size_t)i * C + o) * taps + taps - 1 - tap));
                    else
                        put(p, at, get(w, ((size_t)o * C + i) * taps + tap));
                }
    return p;
}

typedef struct {
    int N, C, H, W, K, fh, fw, pad;
} geometry;

typedef struct {
    int k_tile, vectors, channel_lanes; /* a forward tile: k_tile channels (a multiple of lanes with lanes) */
} tile;

typedef struct {
    arr out, pooled, dx, dw, db;
} results;

static void free_results(results *r)
{
    release(r->out.p), release(r->pooled.p), release(r->dx.p), release(r->dw.p), release(r->db.p);
}

/* Forward (and, unless pooled, backward) with the kernels fns, as the plan lays them out with tile t. */
static results run(const fc_dconv_functions_t *fns, int dbl, geometry g, tile t, arr x, arr w, arr b, arr dout,
                   int relu, int pooled, int threads)
{
    const int lanes = fns->vector_bytes / (dbl ? 8 : 4), registers = fns->registers;
    const int out_h = g.H + 2 * g.pad - g.fh + 1, out_w = g.W + 2 * g.pad - g.fw + 1;
    const int c_chunk = t.channel_lanes ? 2 : g.C; /* channels-in-lanes: carry sums between chunks */
    fc_tile_pass f = tile_pass(g.C, g.K, g.H, g.W, g.pad, g.pad, g.fh, g.fw, lanes, t.k_tile, t.vectors,
                               t.channel_lanes, c_chunk);
    fc_tile_pass d = tile_pass(g.K, g.C, out_h, out_w, g.fh - 1 - g.pad, g.fw - 1 - g.pad, g.fh, g.fw, lanes,
                               t.k_tile, t.vectors, t.channel_lanes, t.channel_lanes ? 3 : g.K);
    CHECK(fns->has_tile(t.channel_lanes, t.k_tile, t.vectors), "tile %d x %d not compiled", t.k_tile, t.vectors);
    const int w_blocks = (int)ceil_div(g.K, lanes);
    const int pair = registers >= 32 && w_blocks > 1;
    const int groups = g.N < 16 ? g.N : 16;
    const int one_channel = g.C == 1;
    const int dt_rows = out_h + 2 * (g.fh - 1 - g.pad), dt_cols = out_w + 2 * (g.fw - 1 - g.pad);
    const long dt_block = ((long)dt_rows * dt_cols + lanes) * lanes;
    const long pixels = (long)out_h * out_w;
    long transposed, planes, grid, masked;
    if (one_channel)
        transposed = w_blocks * dt_block, planes = grid = masked = 0;
    else
        transposed = w_blocks * pixels * lanes, planes = d.image_stride, grid = (long)d.k_tile * d.grid_stride,
        masked = g.K * pixels;
    const long forward_scratch = (long)f.k_tile * f.grid_stride + f.image_stride + g.K * pixels;
    const long backward_scratch = transposed + planes + grid + masked;
    const long align = FC_SCRATCH_ALIGNMENT / (dbl ? 8 : 4);
    const long stride = (forward_scratch > backward_scratch ? forward_scratch : backward_scratch) + align;
    arr scratch = make(dbl, (size_t)threads * stride);
    arr packed_input = make(dbl, (size_t)g.N * f.image_stride);
    arr wf = pack(w, g.K, g.C, g.fh, g.fw, t.k_tile, 0);
    arr bias = make(dbl, (size_t)f.k_blocks * f.k_tile);
    for (int k = 0; k < g.K; k++)
        put(bias, k, get(b, k));
    results r;
    memset(&r, 0, sizeof r);
    const int ph = out_h / 2, pw = out_w / 2;
    r.out = make(dbl, (size_t)g.N * g.K * pixels);
    if (pooled)
        r.pooled = make(dbl, (size_t)g.N * g.K * ph * pw);

    fc_forward_job job;
    memset(&job, 0, sizeof job);
    job.pass = f;
    job.batch = g.N;
    job.x = x.p, job.packed = pooled ? NULL : packed_input.p, job.weights = wf.p, job.bias = bias.p;
    job.out = pooled ? NULL : r.out.p;
    job.scratch = scratch.p, job.scratch_stride = stride, job.relu = relu;
    job.pooled = pooled ? r.pooled.p : NULL, job.pooled_h = ph, job.pooled_w = pw;
    job.next = 0;
    fc_pool_run(threads, fns->forward, &job);
    if (pooled) {
        release(scratch.p), release(packed_input.p), release(wf.p), release(bias.p);
        return r;
    }

    /* channel tiles: the compiled sizes, largest first, at most PAIR_CHANNELS (8) when paired */
    int ct[64], n_ct = 0, first = 0, entry[3];
    const int n_sizes = fc_dconv_tiles(FC_CHANNEL_TILES, registers, 0, entry);
    for (int i = 0; i < n_sizes; i++) {
        fc_dconv_tiles(FC_CHANNEL_TILES, registers, i, entry);
        if (pair && entry[0] > 8)
            continue;
        while (g.C - first >= entry[0]) {
            ct[2 * n_ct] = first, ct[2 * n_ct + 1] = entry[0];
            first += entry[0], n_ct++;
        }
    }
    CHECK(first == g.C, "channel tiles do not cover %d channels", g.C);
    arr wd = one_channel ? pack(w, g.K, g.C, g.fh, g.fw, lanes, 0) : pack(w, g.K, g.C, g.fh, g.fw, d.k_tile, 1);
    arr zeros = make(dbl, (size_t)d.k_blocks * d.k_tile);
    const long group_elements = (long)w_blocks * g.C * g.fh * g.fw * lanes;
    arr dw_groups = make(dbl, (size_t)groups * group_elements);
    double *db_groups = alloc_zeroed((size_t)groups * g.K * sizeof(double));
    r.dx = make(dbl, (size_t)g.N * g.C * g.H * g.W);
    r.dw = make(dbl, (size_t)g.K * g.C * g.fh * g.fw);
    r.db = make(dbl, (size_t)g.K);

    fc_backward_job bj;
    memset(&bj, 0, sizeof bj);
    bj.forward = f, bj.data = d;
    bj.batch = g.N, bj.lanes = lanes, bj.w_blocks = w_blocks, bj.groups = groups;
    bj.one_channel = one_channel, bj.dt_cols = dt_cols, bj.dt_block = dt_block;
    bj.channel_tiles = ct, bj.n_channel_tiles = n_ct, bj.pair_blocks = pair;
    bj.transposed = transposed, bj.grid = grid, bj.planes = planes, bj.masked = masked;
    bj.packed = packed_input.p, bj.dout = dout.p, bj.relu_out = relu ? r.out.p : NULL;
    bj.weights = wd.p, bj.zeros = zeros.p, bj.dx = r.dx.p;
    bj.dw_groups = dw_groups.p, bj.dw_group_elements = group_elements, bj.db_groups = db_groups, bj.dw = r.dw.p;
    bj.scratch = scratch.p, bj.scratch_stride = stride;
    bj.next = 0;
    fc_pool_run(threads < groups ? threads : groups, fns->backward, &bj);
    bj.next = 0;
    fc_pool_run(threads, fns->sum_groups, &bj);
    for (int k = 0; k < g.K; k++) {
        double total = db_groups[k];
        for (int gi = 1; gi < groups; gi++)
            total += db_groups[gi * g.K + k];
        put(r.db, k, total);
    }
    release(scratch.p), release(packed_input.p), release(wf.p), release(bias.p), release(wd.p), release(zeros.p);
    release(dw_groups.p), release(db_groups);
    return r;
}

/* ---- the reference, in double ---- */
static void reference(geometry g, arr x, arr w, arr b, arr dout, int relu, double *out, double *pooled,
                      double *dx, double *dw, double *db)
{
    const int out_h = g.H + 2 * g.pad - g.fh + 1, out_w = g.W + 2 * g.pad - g.fw + 1;
    const int taps = g.fh * g.fw;
#define X(n, c, h, ww) get(x, (((size_t)(n) * g.C + (c)) * g.H + (h)) * g.W + (ww))
#define WT(k, c, i, j) get(w, (((size_t)(k) * g.C + (c)) * g.fh + (i)) * g.fw + (j))
#define REF_OUT(n, k, h, ww) out[(((size_t)(n) * g.K + (k)) * out_h + (h)) * out_w + (ww)]
    for (int n = 0; n < g.N; n++)
        for (int k = 0; k < g.K; k++)
            for (int oh = 0; oh < out_h; oh++)
                for (int ow = 0; ow < out_w; ow++) {
                    double s = get(b, k);
                    for (int c = 0; c < g.C; c++)
                        for (int i = 0; i < g.fh; i++)
                            for (int j = 0; j < g.fw; j++) {
                                int h = oh + i - g.pad, ww = ow + j - g.pad;
                                if (h >= 0 && h < g.H && ww >= 0 && ww < g.W)
                                    s += X(n, c, h, ww) * WT(k, c, i, j);
                            }
                    REF_OUT(n, k, oh, ow) = relu && s <= 0 ? 0 : s;
                }
    const int ph = out_h / 2, pw = out_w / 2;
    for (int n = 0; n < g.N; n++)
        for (int k = 0; k < g.K; k++)
            for (int oh = 0; oh < ph; oh++)
                for (int ow = 0; ow < pw; ow++) {
                    double m = REF_OUT(n, k, 2 * oh, 2 * ow);
                    m = fmax(m, REF_OUT(n, k, 2 * oh, 2 * ow + 1));
                    m = fmax(m, REF_OUT(n, k, 2 * oh + 1, 2 * ow));
                    m = fmax(m, REF_OUT(n, k, 2 * oh + 1, 2 * ow + 1));
                    pooled[(((size_t)n * g.K + k) * ph + oh) * pw + ow] = m;
                }
    memset(dx, 0, sizeof(double) * g.N * g.C * g.H * g.W);
    memset(dw, 0, sizeof(double) * g.K * g.C * taps);
    memset(db, 0, sizeof(double) * g.K);
    for (int n = 0; n < g.N; n++)
        for (int k = 0; k < g.K; k++)
            for (int oh = 0; oh < out_h; oh++)
                for (int ow = 0; ow < out_w; ow++) {
                    size_t o = (((size_t)n * g.K + k) * out_h + oh) * out_w + ow;
                    double dy = relu && out[o] <= 0 ? 0 : get(dout, o);
                    db[k] += dy;
                    for (int c = 0; c < g.C; c++)
                        for (int i = 0; i < g.fh; i++)
                            for (int j = 0; j < g.fw; j++) {
                                int h = oh + i - g.pad, ww = ow + j - g.pad;
                                if (h < 0 || h >= g.H || ww < 0 || ww >= g.W)
                                    continue;
                                dx[(((size_t)n * g.C + c) * g.H + h) * g.W + ww] += dy * WT(k, c, i, j);
                                dw[(((size_t)k * g.C + c) * g.fh + i) * g.fw + j] += dy * X(n, c, h, ww);
                            }
                }
#undef X
#undef WT
#undef REF_OUT
}

static void expect_equal(arr got, const double *want, const char *what, const char *where)
{
    for (size_t i = 0; i < got.n; i++)
        CHECK(get(got, i) == want[i], "%s: %s[%zu] = %.17g, expected %.17g", where, what, i, get(got, i), want[i]);
}

static void expect_same(arr a, arr b, const char *what, const char *where)
{
    CHECK(a.n == b.n && memcmp(a.p, b.p, a.n * (a.dbl ? 8 : 4)) == 0, "%s: %s differs between 1 and 3 threads",
          where, what);
}

static const geometry GEOMETRIES[] = {
    {3, 1, 9, 9, 7, 3, 3, 1},    /* one input channel (its own backward path), channels not a multiple of lanes */
    {2, 5, 7, 6, 9, 3, 3, 1},    /* odd sizes */
    {2, 16, 6, 6, 20, 3, 3, 1},  /* the largest channel tiles; paired blocks and an odd last one */
    {2, 3, 8, 5, 4, 5, 3, 2},    /* a non-square filter */
    {17, 2, 4, 4, 3, 2, 2, 0},   /* more images than groups, no padding */
    {1, 23, 5, 5, 33, 3, 3, 0},  /* every channel tile size */
    {2, 1, 6, 7, 12, 5, 5, 4},   /* one channel, a 5 x 5 filter */
};

static int kernel_checks(int variant, int dbl)
{
    const fc_dconv_functions_t *fns = fc_dconv_functions(variant, dbl);
    const int lanes = fns->vector_bytes / (dbl ? 8 : 4);
    int entry[3], cases = 0;
    tile tiles[32];
    int n_tiles = 0;
    for (int i = 0; i < fc_dconv_tiles(FC_FORWARD_TILES, fns->registers, 0, entry); i++) {
        fc_dconv_tiles(FC_FORWARD_TILES, fns->registers, i, entry);
        tiles[n_tiles++] = (tile){entry[0], entry[1], 0};
    }
    for (int i = 0; i < fc_dconv_tiles(FC_PIXEL_TILES, fns->registers, 0, entry); i++) {
        fc_dconv_tiles(FC_PIXEL_TILES, fns->registers, i, entry);
        tiles[n_tiles++] = (tile){entry[0] * lanes, entry[1], 1};
    }
    for (size_t gi = 0; gi < sizeof GEOMETRIES / sizeof GEOMETRIES[0]; gi++) {
        geometry g = GEOMETRIES[gi];
        const int out_h = g.H + 2 * g.pad - g.fh + 1, out_w = g.W + 2 * g.pad - g.fw + 1;
        const size_t nx = (size_t)g.N * g.C * g.H * g.W, nw = (size_t)g.K * g.C * g.fh * g.fw;
        const size_t no = (size_t)g.N * g.K * out_h * out_w, np = (size_t)g.N * g.K * (out_h / 2) * (out_w / 2);
        arr x = make(dbl, nx), w = make(dbl, nw), b = make(dbl, g.K), dout = make(dbl, no);
        for (size_t i = 0; i < nx; i++)
            put(x, i, draw(-4, 4));
        for (size_t i = 0; i < nw; i++)
            put(w, i, draw(-1, 1));
        for (int i = 0; i < g.K; i++)
            put(b, i, draw(-4, 4));
        for (size_t i = 0; i < no; i++)
            put(dout, i, draw(-4, 4));
        double *out = alloc_zeroed(no * sizeof(double)), *pooled = alloc_zeroed(np * sizeof(double));
        double *dx = alloc_zeroed(nx * sizeof(double)), *dw = alloc_zeroed(nw * sizeof(double));
        double *db = alloc_zeroed(g.K * sizeof(double));
        for (int relu = 0; relu <= 1; relu++) {
            reference(g, x, w, b, dout, relu, out, pooled, dx, dw, db);
            for (int ti = 0; ti < n_tiles; ti++) {
                char where[160];
                snprintf(where, sizeof where, "%s %s N%d C%d %dx%d K%d %dx%d pad %d, tile %d x %d%s%s",
                         fc_dconv_variant_name(variant), dbl ? "double" : "float", g.N, g.C, g.H, g.W, g.K, g.fh,
                         g.fw, g.pad, tiles[ti].k_tile, tiles[ti].vectors, tiles[ti].channel_lanes ? " (lanes)" : "",
                         relu ? ", relu" : "");
                results one = run(fns, dbl, g, tiles[ti], x, w, b, dout, relu, 0, 1);
                results three = run(fns, dbl, g, tiles[ti], x, w, b, dout, relu, 0, 3);
                expect_equal(one.out, out, "out", where);
                expect_equal(one.dx, dx, "dx", where);
                expect_equal(one.dw, dw, "dW", where);
                expect_equal(one.db, db, "db", where);
                expect_same(one.out, three.out, "out", where);
                expect_same(one.dx, three.dx, "dx", where);
                expect_same(one.dw, three.dw, "dW", where);
                expect_same(one.db, three.db, "db", where);
                if (np && relu) {
                    results p = run(fns, dbl, g, tiles[ti], x, w, b, dout, relu, 1, 3);
                    expect_equal(p.pooled, pooled, "pooled", where);
                    free_results(&p);
                }
                free_results(&one);
                free_results(&three);
                cases++;
            }
        }
        release(x.p), release(w.p), release(b.p), release(dout.p);
        release(out), release(pooled), release(dx), release(dw), release(db);
    }
    return cases;
}

/* ---- the floating-point control register of the calling thread, and whether it flushes subnormals ---- */
#if defined(__x86_64__) || defined(__i386__)
static unsigned long long fp_control(void) { return _mm_getcsr(); }
#define FLUSH_BITS 0x8040ull
#define FP_CONTROL "MXCSR"
#elif defined(__aarch64__)
static unsigned long long fp_control(void)
{
    unsigned long long v;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(v));
    return v;
}
#define FLUSH_BITS (1ull << 24)
#define FP_CONTROL "FPCR"
#else
static unsigned long long fp_control(void) { return 0; }
#define FLUSH_BITS 0ull
#define FP_CONTROL "none"
#endif

typedef struct {
    unsigned long long control[8];
    double product[8];
    volatile double tiny, one;
} fp_probe;

static void probe_task(void *arg, int thread)
{
    fp_probe *p = arg;
    p->control[thread] = fp_control();
    p->product[thread] = p->tiny * p->one; /* a subnormal, unless flushed */
}

static void subnormal_checks(int variant)
{
    for (int dbl = 0; dbl <= 1; dbl++) {
        const fc_dconv_functions_t *fns = fc_dconv_functions(variant, dbl);
        const int lanes = fns->vector_bytes / (dbl ? 8 : 4);
        geometry g = {4, 2, 6, 6, 3, 3, 3, 1};
        const size_t nx = (size_t)g.N * g.C * g.H * g.W, nw = (size_t)g.K * g.C * 9, no = (size_t)g.N * g.K * 36;
        arr x = make(dbl, nx), w = make(dbl, nw), b = make(dbl, g.K), dout = make(dbl, no);
        /* subnormal inputs whose sums stay subnormal: 18 * 1e-40 (float) or 18 * 1e-310 (double) */
        const double tiny = dbl ? 1e-310 : 1e-40;
        fill(x, tiny);
        fill(w, 1);
        fill(dout, 1);
        unsigned long long before = fp_control();
        tile t = {lanes, 1, 0};
        int entry[3];
        fc_dconv_tiles(FC_FORWARD_TILES, fns->registers, 0, entry);
        t.k_tile = entry[0], t.vectors = entry[1];
        results r = run(fns, dbl, g, t, x, w, b, dout, 0, 0, 3);
        CHECK(fp_control() == before, "the caller's %s changed by the kernels: %llx -> %llx", FP_CONTROL, before,
              fp_control());
        int flushed = 1;
        for (size_t i = 0; i < r.out.n; i++)
            flushed &= get(r.out, i) == 0;
        for (size_t i = 0; i < r.dw.n; i++)
            flushed &= get(r.dw, i) == 0; /* dW: dout (1) times subnormal inputs, summed */
        if (FLUSH_BITS != 0) {
            CHECK(flushed, "%s %s: subnormal inputs were not flushed to zero inside the kernels",
                  fc_dconv_variant_name(variant), dbl ? "double" : "float");
        }
        /* and outside them, on every thread of the pool, subnormals are computed as usual */
        fp_probe p;
        memset(&p, 0, sizeof p);
        p.tiny = 1e-310, p.one = 1; /* a double subnormal: its product stays one unless flushed */
        int team = fc_pool_run(3, probe_task, &p);
        for (int i = 0; i < team; i++) {
            CHECK((p.control[i] & FLUSH_BITS) == (before & FLUSH_BITS),
                  "thread %d's %s is %llx after the kernels (before: %llx)", i, FP_CONTROL, p.control[i], before);
            CHECK(p.product[i] != 0, "thread %d flushes subnormals after the kernels", i);
        }
        printf("  %s %s: subnormals flushed inside the kernels (%s bits %llx), %d threads' %s as before\n",
               fc_dconv_variant_name(variant), dbl ? "double" : "float", FP_CONTROL, FLUSH_BITS, team, FP_CONTROL);
        free_results(&r);
        release(x.p), release(w.p), release(b.p), release(dout.p);
    }
}

/* ---- the pool ---- */
typedef struct {
    long next;
    int tasks;
    int *taken; /* how often each task ran */
    int threads_seen[64];
} count_job;

static void count_task(void *arg, int thread)
{
    count_job *job = arg;
    long t;
    job->threads_seen[thread] = 1;
    while ((t = fc_next_task(&job->next)) < job->tasks)
        job->taken[t]++; /* each task is taken by one thread */
}

static int pool_round(int threads, int tasks)
{
    count_job job;
    memset(&job, 0, sizeof job);
    job.tasks = tasks;
    job.taken = alloc_zeroed((size_t)tasks * sizeof(int));
    int team = fc_pool_run(threads, count_task, &job);
    for (int i = 0; i < tasks; i++)
        CHECK(job.taken[i] == 1, "task %d ran %d times", i, job.taken[i]);
    for (int i = 0; i < team; i++)
        CHECK(job.threads_seen[i], "thread %d of %d did not run", i, team);
    release(job.taken);
    return team;
}

#if defined(_WIN32)
static DWORD WINAPI other_caller(LPVOID arg)
#else
static void *other_caller(void *arg)
#endif
{
    for (int i = 0; i < 300; i++)
        pool_round(3, 500);
    (void)arg;
    return 0;
}

static void pool_checks(void)
{
    CHECK(fc_pool_threaded(), "built without threads (FASTCONV_THREADS)");
    CHECK(pool_round(1, 10) == 1, "one thread asked, more took part");
    CHECK(pool_round(4, 1000) == 4, "four threads asked, another number took part");
    /* many short runs: workers sleep between them (poll 0) or catch them polling (100 us) */
    for (int poll = 0; poll <= 1; poll++) {
        fc_pool_set_poll_ns(poll ? 100000 : 0);
        for (int i = 0; i < 2000; i++)
            pool_round(1 + i % 4, 1 + i % 97);
    }
    /* two callers at once: one runs on the pool, the other (while the pool is busy) on its thread alone */
#if defined(_WIN32)
    HANDLE other = CreateThread(NULL, 0, other_caller, NULL, 0, NULL);
    CHECK(other != NULL, "CreateThread failed");
    other_caller(NULL);
    WaitForSingleObject(other, INFINITE);
    CloseHandle(other);
#else
    pthread_t other;
    CHECK(pthread_create(&other, NULL, other_caller, NULL) == 0, "pthread_create failed");
    other_caller(NULL);
    pthread_join(other, NULL);
#endif
    fc_pool_set_poll_ns(0);
    printf("  pool: threaded, %d threads at most, 4000 short runs polling and sleeping, two callers at once\n",
           pool_round(8, 100));
}

int main(void)
{
    void *probe = alloc_zeroed(1);
    printf("dconv_test: %d-bit, long %d bytes, pointers %d bytes, arrays at %p and so on\n", (int)(8 * sizeof(void *)),
           (int)sizeof(long), (int)sizeof(void *), probe);
    release(probe);
    pool_checks();
    int any = 0;
    for (int v = 0; v < FC_VARIANTS; v++) {
        const fc_dconv_functions_t *fns = fc_dconv_functions(v, 0);
        if (!fns) {
            printf("  %s: not compiled\n", fc_dconv_variant_name(v));
            continue;
        }
        if (!fc_dconv_available(v)) {
            printf("  %s: compiled (%d-byte vectors, %d registers), not run by this CPU\n", fc_dconv_variant_name(v),
                   fns->vector_bytes, fns->registers);
            continue;
        }
        int cases = kernel_checks(v, 0) + kernel_checks(v, 1);
        printf("  %s: %d-byte vectors, %d registers: %d cases (geometry, dtype, forward tile, relu) equal to the "
               "reference, on 1 and 3 threads\n", fc_dconv_variant_name(v), fns->vector_bytes, fns->registers, cases);
        subnormal_checks(v);
        any = 1;
    }
    CHECK(any, "no variant compiled and run");
    printf("dconv_test: ok\n");
    return 0;
}
