"""Direct convolution kernels (``dconv_forward.h``, ``dconv_backward.h``), run on the pool of ``_parallel``.

The caller (``fastconv/backends/cython.py``) passes a plan of ``fastconv/_plan.py``,
which holds every size, tile and choice, and flat C-contiguous arrays. The
checks below only make sure that no kernel can reach outside those arrays: they
bound what the kernels touch by what the plan and the arrays provide.

The variants (``VARIANTS``: ``dconv.h``'s list, whose order the backend
checks against ``_plan.VARIANTS``), what each is compiled with
(``compiled_variant``) and the tiles of ``dconv_tiles.h`` (``tiles``) are read
from the C code, so that the backend and the tests can check them against the
plan.
"""
from cython cimport floating

from fastconv._ext._parallel cimport fc_task_fn, run_tasks

cdef extern from "dconv.h":
    ctypedef struct fc_tile_pass:
        int in_channels, out_channels, src_h, src_w, border_h, border_w, in_h, in_w, out_h, out_w
        int filter_h, filter_w, k_tile, vectors, k_blocks, grid_tiles, channel_lanes, c_chunk
        Py_ssize_t in_plane, image_stride, grid_stride

    ctypedef struct fc_forward_job:
        fc_tile_pass pass_ "pass"
        Py_ssize_t batch
        const void *x
        void *packed
        const void *weights
        const void *bias
        void *out
        void *scratch
        Py_ssize_t scratch_stride
        int relu
        void *pooled
        int pooled_h, pooled_w
        long next

    ctypedef struct fc_backward_job:
        fc_tile_pass forward
        fc_tile_pass data
        Py_ssize_t batch
        int lanes, w_blocks, groups
        int one_channel, dt_cols
        Py_ssize_t dt_block
        const int *channel_tiles
        int n_channel_tiles
        int pair_blocks
        Py_ssize_t transposed, grid, planes, masked
        const void *packed
        const void *dout
        const void *relu_out
        const void *weights
        const void *zeros
        void *dx
        void *dw_groups
        Py_ssize_t dw_group_elements
        double *db_groups
        void *dw
        void *scratch
        Py_ssize_t scratch_stride
        long next

    ctypedef struct fc_dconv_functions_t:
        int vector_bytes, registers
        fc_task_fn forward
        fc_task_fn backward
        fc_task_fn sum_groups
        int (*has_tile)(int channel_lanes, int k_tile, int vectors) nogil
        int (*has_weights_tile)(int channels, int paired) nogil

    enum:
        FC_VARIANTS
        FC_SCRATCH_ALIGNMENT
        FC_FORWARD_TILES
        FC_PIXEL_TILES
        FC_CHANNEL_TILES

    const char *fc_dconv_variant_name(int variant) nogil
    int fc_dconv_available(int variant) nogil
    const fc_dconv_functions_t *fc_dconv_functions(int variant, int is_double) nogil
    int fc_dconv_tiles(int kind, int registers, int i, int entry[3]) nogil

# the variants' names, in the order of dconv.h's enum
VARIANTS = tuple((<bytes>fc_dconv_variant_name(i)).decode() for i in range(FC_VARIANTS))
_INDEX = {name: i for i, name in enumerate(VARIANTS)}

# a thread's scratch region may start this many bytes late, to begin on an aligned boundary
SCRATCH_ALIGNMENT = FC_SCRATCH_ALIGNMENT

_TILE_KINDS = {"forward": FC_FORWARD_TILES, "pixel": FC_PIXEL_TILES, "channel": FC_CHANNEL_TILES}


def _index(str variant):
    try:
        return _INDEX[variant]
    except KeyError:
        raise ValueError(f"there is no variant {variant!r} (variants: {', '.join(VARIANTS)})") from None


def available(str variant):
    """Whether this CPU runs ``variant`` and it was compiled in."""
    return bool(fc_dconv_available(_index(variant)))


def compiled_variant(str variant):
    """(vector bytes, registers) of ``variant`` as compiled, or None where it was not compiled in."""
    cdef const fc_dconv_functions_t *fns = fc_dconv_functions(_index(variant), 0)
    if fns == NULL:
        return None
    return (fns.vector_bytes, fns.registers)


def tiles(str kind, int registers):
    """The tiles of ``dconv_tiles.h`` for ``registers`` vector registers, in order: for kind "forward"
    (output channels, vectors), "pixel" (vectors of output channels, pixels), "channel" (input channels,
    partial sums, paired)."""
    cdef int entry[3]
    cdef int which = _TILE_KINDS[kind]
    cdef int i, count = fc_dconv_tiles(which, registers, 0, entry)
    found = []
    for i in range(count):
        fc_dconv_tiles(which, registers, i, entry)
        tile = (entry[0], entry[1], entry[2])
        found.append(tile if which == FC_CHANNEL_TILES else tile[:2])
    return tuple(found)


cdef fc_tile_pass _tile_pass(object p, int filter_h, int filter_w, int lanes,
                             const fc_dconv_functions_t *fns) except *:
    cdef fc_tile_pass t
    t.in_channels, t.out_channels = p.in_channels, p.out_channels
    t.src_h, t.src_w, t.border_h, t.border_w = p.src_h, p.src_w, p.border_h, p.border_w
    t.in_h, t.in_w, t.out_h, t.out_w = p.in_h, p.in_w, p.out_h, p.out_w
    t.filter_h, t.filter_w = filter_h, filter_w
    t.k_tile, t.vectors, t.k_blocks, t.grid_tiles = p.k_tile, p.vectors, p.k_blocks, p.grid_tiles
    t.channel_lanes, t.c_chunk = p.channel_lanes, p.c_chunk
    t.in_plane, t.image_stride, t.grid_stride = p.in_plane, p.image_stride, p.grid_padded
    if (t.in_channels < 1 or t.out_channels < 1 or t.c_chunk < 1 or t.out_h < 1 or t.out_w < 1 or t.filter_h < 1
            or t.filter_w < 1 or t.border_h < 0 or t.border_w < 0 or t.src_h < 0 or t.src_w < 0):
        raise ValueError("empty convolution pass")
    if not fns.has_tile(t.channel_lanes, t.k_tile, t.vectors):
        raise ValueError(f"no tile of {t.k_tile} channels x {t.vectors} is compiled for this variant")
    # the planes hold the sources and every tap of every output; the blocks cover the output channels
    if (t.border_h + t.src_h > t.in_h or t.border_w + t.src_w > t.in_w or t.in_plane < <Py_ssize_t>t.in_h * t.in_w
            or t.out_h + t.filter_h - 1 > t.in_h or t.out_w + t.filter_w - 1 > t.in_w
            or t.k_blocks * t.k_tile < t.out_channels):
        raise ValueError("the pass's planes do not hold its sources and its outputs' taps")
    cdef Py_ssize_t covered, reach
    if t.channel_lanes:  # rows of pixels
        covered = <Py_ssize_t>t.grid_tiles * t.vectors
        if covered < <Py_ssize_t>t.out_h * t.out_w or covered > t.grid_stride:
            raise ValueError("the pass's tiles do not cover its pixels inside its grid")
        reach = <Py_ssize_t>t.in_channels * t.in_plane
    else:  # grid positions, whose taps read up to (filter_h - 1) rows and filter_w - 1 columns further
        covered = <Py_ssize_t>t.grid_tiles * t.vectors * lanes
        if covered < <Py_ssize_t>t.out_h * t.in_w or covered > t.grid_stride:
            raise ValueError("the pass's tiles do not cover its grid inside its stride")
        reach = ((t.in_channels - 1) * t.in_plane + covered + <Py_ssize_t>(t.filter_h - 1) * t.in_w
                 + t.filter_w - 1)
    if reach > t.image_stride or <Py_ssize_t>t.in_channels * t.in_plane > t.image_stride:
        raise ValueError("the pass's image stride is shorter than what its tiles read")
    return t


cdef const fc_dconv_functions_t *_functions(object plan, bint is_double, Py_ssize_t itemsize) except NULL:
    """The kernels of the plan's variant, once its vectors are known to hold the plan's lanes."""
    cdef int variant = _index(plan.variant)
    if not fc_dconv_available(variant):
        raise ValueError(f"variant {plan.variant} is not available on this CPU")
    cdef const fc_dconv_functions_t *fns = fc_dconv_functions(variant, is_double)
    if plan.lanes * itemsize != fns.vector_bytes:
        raise ValueError(f"{plan.variant} vectors do not hold {plan.lanes} elements of {itemsize} bytes")
    return fns


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


def conv_forward(object plan, const floating[::1] x, floating[::1] packed,
                 const floating[::1] weights, const floating[::1] bias, floating[::1] out,
                 floating[::1] scratch, Py_ssize_t scratch_stride, int num_threads, bint relu=False,
                 floating[::1] pooled=None, int pooled_h=0, int pooled_w=0):
    """out = convolution of x plus bias (then max(out, 0) with relu), as ``plan`` (a ``_plan.ConvPlan``)
    cuts it, with the kernels of its variant; packed = x's padded planes (kept for backward), or None when
    no backward follows (each image's planes then go to thread scratch). With ``pooled`` (and packed and
    out None): only out's 2 x 2 max pooling with stride 2, of pooled_h x pooled_w per plane, is written
    there, each image's out staying in thread scratch."""
    cdef fc_forward_job job
    cdef const fc_dconv_functions_t *fns = _functions(plan, floating is double, sizeof(floating))
    job.pass_ = _tile_pass(plan.forward, plan.filter_h, plan.filter_w, plan.lanes, fns)
    cdef fc_tile_pass *p = &job.pass_
    cdef Py_ssize_t batch = plan.batch
    cdef Py_ssize_t align = SCRATCH_ALIGNMENT // sizeof(floating)
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
        if pooled_h < 1 or pooled_w < 1 or 2 * pooled_h > p.out_h or 2 * pooled_w > p.out_w:
            raise ValueError(f"a {pooled_h} x {pooled_w} pooling of 2 x 2 windows does not fit a "
                             f"{p.out_h} x {p.out_w} output")
        _need(pooled.shape[0], batch * p.out_channels * pooled_h * pooled_w, "pooled")
    _need(scratch_stride, p.k_tile * p.grid_stride + (p.image_stride if packed is None else 0)
          + (out_image if pooled is not None else 0) + align, "scratch_stride")
    _need(scratch.shape[0], num_threads * scratch_stride, "scratch")
    if batch == 0:
        return
    job.batch = batch
    job.x, job.weights, job.bias = &x[0], &weights[0], &bias[0]
    job.out = &out[0] if out is not None else NULL
    job.pooled = &pooled[0] if pooled is not None else NULL
    job.pooled_h, job.pooled_w = pooled_h, pooled_w
    job.packed = &packed[0] if packed is not None else NULL
    job.scratch, job.scratch_stride, job.next = &scratch[0], scratch_stride, 0
    job.relu = relu
    with nogil:
        run_tasks(num_threads, fns.forward, &job)


def conv_backward(object plan, const int[::1] channel_tiles, const floating[::1] packed,
                  const floating[::1] dout, const floating[::1] weights, const floating[::1] zeros,
                  floating[::1] dx, floating[::1] dw_groups, double[::1] db_groups, floating[::1] dw,
                  floating[::1] db, floating[::1] scratch, Py_ssize_t scratch_stride, int num_threads,
                  const floating[::1] relu_out=None):
    """dx, dw and db from dout and forward's packed planes, as ``plan`` cuts them, with the kernels of its
    variant; dx may be None (not computed). ``channel_tiles`` is ``plan.channel_tiles`` flat.

    dw_groups and db_groups receive each group's sums; they are added in group order. With
    ``relu_out`` (the output of a forward with relu), dout is the gradient of that output:
    it is taken as zero where the ReLU is off at relu_out.
    """
    cdef fc_backward_job job
    cdef int lanes = plan.lanes
    cdef const fc_dconv_functions_t *fns = _functions(plan, floating is double, sizeof(floating))
    job.forward = _tile_pass(plan.forward, plan.filter_h, plan.filter_w, lanes, fns)
    job.data = _tile_pass(plan.backward_data, plan.filter_h, plan.filter_w, lanes, fns)
    cdef fc_tile_pass *f = &job.forward
    cdef fc_tile_pass *d = &job.data
    cdef Py_ssize_t align = SCRATCH_ALIGNMENT // sizeof(floating)
    cdef Py_ssize_t batch = plan.batch, groups = plan.groups, w_blocks = plan.w_blocks
    cdef Py_ssize_t K = f.out_channels, C = f.in_channels, pixels = f.out_h * f.out_w
    cdef Py_ssize_t taps = f.filter_h * f.filter_w
    cdef Py_ssize_t group_elements = plan.dw_group_elements
    cdef bint one_channel = plan.one_channel_data, pair_blocks = plan.pair_blocks
    cdef Py_ssize_t transposed, planes, grid, masked
    transposed, planes, grid, masked = plan.backward_buffers
    cdef Py_ssize_t i, g, count, covered = 0
    cdef double total
    if (d.in_channels != K or d.out_channels != C or d.src_h != f.out_h or d.src_w != f.out_w
            or d.out_h != f.src_h or d.out_w != f.src_w):
        raise ValueError("the backward-data pass does not match the forward pass")
    if groups < 1 or groups > batch:
        raise ValueError("groups must be between 1 and the batch size")
    if w_blocks * lanes < K:
        raise ValueError("the blocks of lanes do not cover the output channels")
    if channel_tiles.shape[0] % 2:
        raise ValueError("channel_tiles holds (first, count) pairs")
    for i in range(0, channel_tiles.shape[0], 2):
        count = channel_tiles[i + 1]
        if channel_tiles[i] != covered or count < 1:
            raise ValueError("channel_tiles must cover the channels in order")
        if not fns.has_weights_tile(count, 0) or (pair_blocks and not fns.has_weights_tile(count, 1)):
            raise ValueError(f"no backward-weights tile of {count} channels{' (paired)' if pair_blocks else ''} "
                             "is compiled for this variant")
        covered += count
    if covered != C:
        raise ValueError("channel_tiles must cover the channels")
    _need(packed.shape[0], batch * f.image_stride, "packed")
    _need(dout.shape[0], batch * K * pixels, "dout")
    if relu_out is not None:
        _need(relu_out.shape[0], batch * K * pixels, "relu_out")
    if one_channel:
        _check_bordered(plan, f, lanes, transposed)
        _need(weights.shape[0], w_blocks * lanes * taps, "weights")
    else:
        _need(transposed, w_blocks * pixels * lanes, "the transposed dout's scratch")
        _need(grid, d.k_tile * d.grid_stride, "the dx pass's grid scratch")
        _need(planes, d.image_stride, "the dx pass's planes scratch")
        _need(masked, K * pixels if relu_out is not None else 0, "the masked dout's scratch")
        _need(weights.shape[0], d.k_blocks * d.k_tile * d.in_channels * taps, "weights")
        _need(zeros.shape[0], d.k_blocks * d.k_tile, "zeros")
    _need(scratch_stride, transposed + grid + planes + masked + align, "scratch_stride")
    if dx is not None:
        _need(dx.shape[0], batch * C * f.src_h * f.src_w, "dx")
    _need(group_elements, w_blocks * C * taps * lanes, "a group's dw sums")
    _need(dw_groups.shape[0], groups * group_elements, "dw_groups")
    _need(db_groups.shape[0], groups * K, "db_groups")
    _need(dw.shape[0], K * C * taps, "dw")
    _need(db.shape[0], K, "db")
    _need(scratch.shape[0], num_threads * scratch_stride, "scratch")
    job.one_channel, job.dt_cols, job.dt_block = one_channel, plan.dt_cols, plan.dt_block
    job.batch, job.lanes, job.w_blocks, job.groups = batch, lanes, w_blocks, groups
    job.channel_tiles, job.n_channel_tiles = &channel_tiles[0], channel_tiles.shape[0] // 2
    job.pair_blocks = pair_blocks
    job.transposed, job.grid, job.planes, job.masked = transposed, grid, planes, masked
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


cdef void _check_bordered(object plan, fc_tile_pass *f, int lanes, Py_ssize_t transposed) except *:
    """The one-channel path: dout's zero-bordered blocks (dt_rows x dt_cols vectors, dt_block elements
    each) hold its interior, and the dx pass's reads stay inside them."""
    cdef Py_ssize_t rows = plan.dt_rows, cols = plan.dt_cols, block = plan.dt_block, w_blocks = plan.w_blocks
    cdef Py_ssize_t top = f.filter_h - 1 - f.border_h, left = f.filter_w - 1 - f.border_w
    # the last vector dx reads: row src_h - 1 + filter_h - 1, the last column's vectors, filter_w - 1 on
    cdef Py_ssize_t last_read = ((f.src_h + f.filter_h - 2) * cols + (f.src_w - 1) // lanes * lanes + lanes - 1
                                 + f.filter_w - 1)
    if (f.in_channels != 1 or top < 0 or left < 0 or top + f.out_h > rows or left + f.out_w > cols
            or f.src_h + f.filter_h - 1 > rows or f.src_w + f.filter_w - 1 > cols
            or rows * cols * lanes > block or (last_read + 1) * lanes > block):
        raise ValueError("the one-channel path needs one input channel and blocks that hold dout's border")
    _need(transposed, w_blocks * block, "the bordered dout's scratch")
