"""Direct convolution kernels (``dconv_impl.h``), run on the pool of ``_parallel``.

The caller (``fastconv/backends/cython.py``) takes every size from a plan of
``fastconv/_plan.py`` and passes flat C-contiguous arrays; the checks below
only make sure that no kernel can reach outside them.
"""
from cython cimport floating

from fastconv._ext._parallel cimport fc_task_fn, run_tasks

cdef extern from "dconv.h":
    ctypedef struct fc_tile_pass:
        int in_channels, out_channels, src_h, src_w, border_h, border_w, in_h, in_w, out_h, out_w
        int filter_h, filter_w, k_tile, vectors, k_blocks, grid_tiles, channel_lanes, c_chunk
        long in_plane, image_stride, grid_stride

    ctypedef struct fc_forward_job:
        fc_tile_pass pass_ "pass"
        long batch
        const void *x
        void *packed
        const void *weights
        const void *bias
        void *out
        void *scratch
        long scratch_stride
        int relu
        void *pooled
        long next

    ctypedef struct fc_backward_job:
        fc_tile_pass forward
        fc_tile_pass data
        long batch
        int lanes, w_blocks, groups
        int one_channel, dt_cols
        long dt_block
        const int *channel_tiles
        int n_channel_tiles
        const void *packed
        const void *dout
        const void *relu_out
        const void *weights
        const void *zeros
        void *dx
        void *dw_groups
        long dw_group_elements
        double *db_groups
        void *dw
        void *scratch
        long scratch_stride
        long next

    ctypedef struct fc_dconv_functions_t:
        fc_task_fn forward
        fc_task_fn backward
        fc_task_fn sum_groups
        int (*has_tile)(int channel_lanes, int k_tile, int vectors) nogil

    int fc_dconv_available(int variant) nogil
    const fc_dconv_functions_t *fc_dconv_functions(int variant, int is_double) nogil

# in the order of dconv.h's enum, best first
VARIANTS = ("avx512", "avx2", "generic")

# a thread's scratch region may start this many bytes late, to begin on a 64-byte boundary
SCRATCH_ALIGNMENT = 64


def available(variant):
    """Whether this CPU runs ``variant`` and it was compiled in."""
    return bool(fc_dconv_available(VARIANTS.index(variant)))


cdef fc_tile_pass _tile_pass(object p, const fc_dconv_functions_t *fns) except *:
    cdef fc_tile_pass t
    t.in_channels, t.out_channels = p.in_channels, p.out_channels
    t.src_h, t.src_w, t.border_h, t.border_w = p.src_h, p.src_w, p.border_h, p.border_w
    t.in_h, t.in_w, t.out_h, t.out_w = p.in_h, p.in_w, p.out_h, p.out_w
    t.filter_h, t.filter_w = p.in_h - p.out_h + 1, p.in_w - p.out_w + 1
    t.k_tile, t.vectors, t.k_blocks, t.grid_tiles = p.k_tile, p.vectors, p.k_blocks, p.grid_tiles
    t.channel_lanes, t.c_chunk = p.channel_lanes, p.c_chunk
    t.in_plane, t.image_stride, t.grid_stride = p.in_plane, p.image_stride, p.grid_padded
    if t.in_channels < 1 or t.out_channels < 1 or t.c_chunk < 1 or t.out_h < 1 or t.out_w < 1 or t.filter_h < 1 or t.filter_w < 1:
        raise ValueError("empty convolution pass")
    if not fns.has_tile(t.channel_lanes, t.k_tile, t.vectors):
        raise ValueError(f"no tile of {t.k_tile} channels x {t.vectors} is compiled for this variant")
    return t


cdef const fc_dconv_functions_t *_functions(int variant, bint is_double) except NULL:
    if not 0 <= variant < len(VARIANTS) or not fc_dconv_available(variant):
        raise ValueError(f"variant {variant} is not available on this CPU")
    return fc_dconv_functions(variant, is_double)


cdef void _need(Py_ssize_t have, Py_ssize_t need, str what) except *:
    if have < need:
        raise ValueError(f"{what} has {have} elements, needs {need}")


def pack_weights(const floating[:, :, :, ::1] w, floating[::1] packed, int k_tile, bint backward_data):
    """The weights in a tile's layout (``fastconv._plan.pack_forward_weights`` and
    ``pack_backward_data_weights``): (blocks, C, FH, FW, k_tile) with zero rows padding K; for
    backward-data, of the weights transposed (K <-> C) and flipped (FH, FW)."""
    cdef Py_ssize_t K = w.shape[0], C = w.shape[1], taps = w.shape[2] * w.shape[3]
    cdef Py_ssize_t outs = C if backward_data else K, ins = K if backward_data else C
    cdef Py_ssize_t blocks = (outs + k_tile - 1) // k_tile
    cdef Py_ssize_t block, i, tap, t, o, at = 0
    if k_tile < 1 or packed.shape[0] < blocks * k_tile * ins * taps:
        raise ValueError("packed is too small for the weights")
    if w.size == 0:
        return
    cdef const floating *source = &w[0, 0, 0, 0]
    cdef floating *p = &packed[0]
    with nogil:
        for block in range(blocks):
            for i in range(ins):
                for tap in range(taps):
                    for t in range(k_tile):
                        o = block * k_tile + t
                        if o >= outs:
                            p[at] = 0
                        elif backward_data:  # w[i, o, FH - 1 - kh, FW - 1 - kw]
                            p[at] = source[(i * C + o) * taps + taps - 1 - tap]
                        else:
                            p[at] = source[(o * C + i) * taps + tap]
                        at += 1


def conv_forward(object tile_pass, Py_ssize_t batch, const floating[::1] x, floating[::1] packed,
                 const floating[::1] weights, const floating[::1] bias, floating[::1] out,
                 floating[::1] scratch, Py_ssize_t scratch_stride, int variant, int num_threads, bint relu=False,
                 floating[::1] pooled=None):
    """out = convolution of x plus bias (then max(out, 0) with relu); packed = x's padded planes (kept for
    backward), or None when no backward follows (each image's planes then go to thread scratch).
    With ``pooled`` (and packed and out None): only out's 2 x 2 max pooling with stride 2 is written
    there, each image's out staying in thread scratch."""
    cdef fc_forward_job job
    cdef const fc_dconv_functions_t *fns = _functions(variant, floating is double)
    job.pass_ = _tile_pass(tile_pass, fns)
    cdef fc_tile_pass *p = &job.pass_
    cdef Py_ssize_t align = SCRATCH_ALIGNMENT // sizeof(floating)
    _need(x.shape[0], batch * p.in_channels * p.src_h * p.src_w, "x")
    if x.shape[0] != batch * p.in_channels * p.src_h * p.src_w:
        raise ValueError("x does not match the plan")
    if packed is not None:
        _need(packed.shape[0], batch * p.image_stride, "packed")
    _need(weights.shape[0], p.k_blocks * p.k_tile * p.in_channels * p.filter_h * p.filter_w, "weights")
    _need(bias.shape[0], p.k_blocks * p.k_tile, "bias")
    cdef Py_ssize_t out_image = p.out_channels * p.out_h * p.out_w
    if pooled is None:
        _need(out.shape[0], batch * out_image, "out")
    else:
        if packed is not None or out is not None:
            raise ValueError("with pooled, packed and out must be None")
        if p.out_h < 2 or p.out_w < 2:
            raise ValueError("2 x 2 pooling needs an output of at least 2 x 2")
        _need(pooled.shape[0], batch * p.out_channels * (p.out_h // 2) * (p.out_w // 2), "pooled")
    _need(scratch_stride, p.k_tile * p.grid_stride + (p.image_stride if packed is None else 0)
          + (out_image if pooled is not None else 0) + align, "scratch_stride")
    _need(scratch.shape[0], num_threads * scratch_stride, "scratch")
    if batch == 0:
        return
    job.batch = batch
    job.x, job.weights, job.bias = &x[0], &weights[0], &bias[0]
    job.out = &out[0] if out is not None else NULL
    job.pooled = &pooled[0] if pooled is not None else NULL
    job.packed = &packed[0] if packed is not None else NULL
    job.scratch, job.scratch_stride, job.next = &scratch[0], scratch_stride, 0
    job.relu = relu
    with nogil:
        run_tasks(num_threads, fns.forward, &job)


def conv_backward(object forward_pass, object data_pass, Py_ssize_t batch, int lanes, int groups,
                  bint one_channel, int dt_rows, int dt_cols, const int[::1] channel_tiles, const floating[::1] packed, const floating[::1] dout,
                  const floating[::1] weights, const floating[::1] zeros, floating[::1] dx,
                  floating[::1] dw_groups, double[::1] db_groups, floating[::1] dw, floating[::1] db,
                  floating[::1] scratch, Py_ssize_t scratch_stride, int variant, int num_threads,
                  const floating[::1] relu_out=None):
    """dx, dw and db from dout and forward's packed planes; dx may be None (not computed).

    dw_groups and db_groups receive each group's sums; they are added in group order. With
    ``relu_out`` (the output of a forward with relu), dout is the gradient of that output:
    it is taken as zero where relu_out <= 0.
    """
    cdef fc_backward_job job
    cdef const fc_dconv_functions_t *fns = _functions(variant, floating is double)
    job.forward = _tile_pass(forward_pass, fns)
    job.data = _tile_pass(data_pass, fns)
    cdef fc_tile_pass *f = &job.forward
    cdef fc_tile_pass *d = &job.data
    cdef Py_ssize_t align = SCRATCH_ALIGNMENT // sizeof(floating)
    cdef Py_ssize_t K = f.out_channels, C = f.in_channels, pixels = f.out_h * f.out_w
    cdef Py_ssize_t w_blocks = (K + lanes - 1) // lanes
    cdef Py_ssize_t group_elements = w_blocks * C * f.filter_h * f.filter_w * lanes
    cdef Py_ssize_t i, g, covered = 0
    cdef double total
    if lanes * sizeof(floating) != (64, 32, 16)[variant]:
        raise ValueError(f"{VARIANTS[variant]} vectors do not hold {lanes} elements")
    if (d.in_channels != K or d.out_channels != C or d.src_h != f.out_h or d.src_w != f.out_w
            or d.out_h != f.src_h or d.out_w != f.src_w):
        raise ValueError("the backward-data pass does not match the forward pass")
    if groups < 1 or groups > batch:
        raise ValueError("groups must be between 1 and the batch size")
    if channel_tiles.shape[0] % 2:
        raise ValueError("channel_tiles holds (first, count) pairs")
    for i in range(0, channel_tiles.shape[0], 2):
        if channel_tiles[i] != covered or channel_tiles[i + 1] not in (1, 2, 4, 8, 16):
            raise ValueError("channel_tiles must cover the channels in order")
        covered += channel_tiles[i + 1]
    if covered != C:
        raise ValueError("channel_tiles must cover the channels")
    _need(packed.shape[0], batch * f.image_stride, "packed")
    _need(dout.shape[0], batch * K * pixels, "dout")
    cdef Py_ssize_t dt_block = (dt_rows * dt_cols + lanes) * lanes
    cdef Py_ssize_t masked = K * pixels if relu_out is not None else 0  # scratch for the masked dout
    if relu_out is not None:
        _need(relu_out.shape[0], batch * K * pixels, "relu_out")
    if one_channel:
        if C != 1 or dt_rows != f.out_h + 2 * (f.filter_h - 1 - f.border_h) or dt_cols != f.out_w + 2 * (f.filter_w - 1 - f.border_w):
            raise ValueError("the one-channel path needs one input channel and dout's bordered size")
        _need(weights.shape[0], w_blocks * lanes * f.filter_h * f.filter_w, "weights")
        _need(scratch_stride, w_blocks * dt_block + align, "scratch_stride")
    else:
        _need(weights.shape[0], d.k_blocks * d.k_tile * d.in_channels * d.filter_h * d.filter_w, "weights")
        _need(zeros.shape[0], d.k_blocks * d.k_tile, "zeros")
        _need(scratch_stride, w_blocks * pixels * lanes + d.k_tile * d.grid_stride + d.image_stride + masked + align,
              "scratch_stride")
    if dx is not None:
        _need(dx.shape[0], batch * C * f.src_h * f.src_w, "dx")
    _need(dw_groups.shape[0], groups * group_elements, "dw_groups")
    _need(db_groups.shape[0], groups * K, "db_groups")
    _need(dw.shape[0], K * C * f.filter_h * f.filter_w, "dw")
    _need(db.shape[0], K, "db")
    _need(scratch.shape[0], num_threads * scratch_stride, "scratch")
    job.one_channel, job.dt_cols, job.dt_block = one_channel, dt_cols, dt_block
    job.batch, job.lanes, job.w_blocks, job.groups = batch, lanes, w_blocks, groups
    job.channel_tiles, job.n_channel_tiles = &channel_tiles[0], channel_tiles.shape[0] // 2
    job.packed, job.dout, job.weights, job.zeros = &packed[0], &dout[0], &weights[0], &zeros[0]
    job.relu_out = &relu_out[0] if relu_out is not None else NULL
    job.dx = &dx[0] if dx is not None else NULL
    job.dw_groups, job.dw_group_elements = &dw_groups[0], group_elements
    job.db_groups, job.dw = &db_groups[0], &dw[0]
    job.scratch, job.scratch_stride = &scratch[0], scratch_stride
    with nogil:
        job.next = 0
        run_tasks(min(num_threads, groups), fns.backward, &job)
        job.next = 0
        run_tasks(num_threads, fns.sum_groups, &job)
        for i in range(K):
            total = db_groups[i]
            for g in range(1, groups):
                total = total + db_groups[g * K + i]
            db[i] = <floating>total
