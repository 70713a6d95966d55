"""The numba backend's backward convolution kernel: dW and db, and dx in the same pass where it can.

Backward-weights keeps one vector of output channels per input channel of a
channel tile and streams over an image's pixels (the layouts and sizes of
``fastconv._plan``). A kernel call is one thread's share of the pass: it
takes groups of images from a shared counter until none is left and sums
each group into the group's own buffer, in order, so that the result is the
same for every thread count. Where backward-data takes the grid tile, each
image's dx follows in the same task (``_numba_forward._grid_image``), so
that the image's ``dout`` is read from memory once.
"""
import numpy as np
from numba import literal_unroll
from numba import uint64 as _ix

from fastconv.backends._numba_forward import _grid_image
from fastconv.backends._numba_kernels import _inlined, _kernel
from fastconv.backends._numba_simd import (_ONE, flush_subnormals, relu_gated, restore_fp, take_next, tile_gather_fma,
                                           tile_load, tile_load_masked, tile_outer_fma, tile_splat, tile_store,
                                           tile_transpose, token)


@_inlined
def _transpose_gradient(dout, mask, n, blocks, lanes, dT):
    """dT (blocks, OH*OW, lanes) = image n of dout with channels innermost (zero past the last), gated by
    ``mask`` (empty, or a fused ReLU's output, flat: ``relu_gated``)."""
    _, K, OH, OW = dout.shape
    V = len(lanes)
    cells = OH * OW
    flat = dout.reshape(-1)
    if K % V:  # lanes past the last channel
        for i in range((blocks - 1) * cells * V, blocks * cells * V):
            dT[_ix(i)] = 0
    for kb in range(blocks):
        k_end = min(K, (kb + 1) * V)
        p0 = 0
        if k_end - kb * V == V:  # squares of V channels x V pixels transposed in registers
            while p0 + V <= cells:
                first = (n * K + kb * V) * cells + p0
                if mask.size:
                    square = tile_load_masked(flat, mask, first, cells, lanes, _ONE, lanes)
                else:
                    square = tile_load(flat, first, cells, lanes, _ONE, lanes)
                tile_store(dT, (kb * cells + p0) * V, V, tile_transpose(square))
                p0 += V
        for p in range(p0, cells):  # consecutive stores: each pixel's vector is written whole
            d = (kb * cells + p) * V - kb * V
            for k in range(kb * V, k_end):
                i = (n * K + k) * cells + p
                dT[_ix(d + k)] = relu_gated(flat[_ix(i)], mask[_ix(i)]) if mask.size else flat[_ix(i)]


@_inlined
def _channel_sums(dT, blocks, cells, K, lanes, zero_one, lane_sums, db):
    """db[k] += the sum of channel k of dT (blocks, cells, lanes): four running vector sums in dT's dtype,
    then their lanes added into db (float64). ``zero_one``: [0, 1] (a vector add is a multiply-add by 1);
    ``lane_sums``: room for one vector."""
    V = len(lanes)
    for kb in range(blocks):
        base = kb * cells * V
        s0 = s1 = s2 = s3 = tile_splat(zero_one, 0, _ONE, _ONE, lanes)
        p = 0
        while p + 4 <= cells:
            s0 = tile_outer_fma(s0, tile_load(dT, base + p * V, 0, _ONE, _ONE, lanes), zero_one, 1, 0)
            s1 = tile_outer_fma(s1, tile_load(dT, base + (p + 1) * V, 0, _ONE, _ONE, lanes), zero_one, 1, 0)
            s2 = tile_outer_fma(s2, tile_load(dT, base + (p + 2) * V, 0, _ONE, _ONE, lanes), zero_one, 1, 0)
            s3 = tile_outer_fma(s3, tile_load(dT, base + (p + 3) * V, 0, _ONE, _ONE, lanes), zero_one, 1, 0)
            p += 4
        for q in range(p, cells):
            s0 = tile_outer_fma(s0, tile_load(dT, base + q * V, 0, _ONE, _ONE, lanes), zero_one, 1, 0)
        total = tile_outer_fma(tile_outer_fma(s0, s1, zero_one, 1, 0), tile_outer_fma(s2, s3, zero_one, 1, 0),
                               zero_one, 1, 0)
        tile_store(lane_sums, 0, 0, total)
        for k in range(kb * V, min(K, (kb + 1) * V)):
            db[k] += lane_sums[k - kb * V]


@_inlined
def _weight_gradient_taps(packed, start, in_w, dT, blocks, OH, OW, dW, t0, rows, tap_offsets, block_pass, lanes):
    """``_weight_gradient`` for a single input channel: dW (blocks, 1, fh, fw, lanes) += one image's products
    of dT and its padded plane, a tile row per filter tap t0, t0 + 1, ... (at ``tap_offsets`` in the plane):
    the taps' chains of additions overlap in one pass over the pixels."""
    V = len(lanes)
    block_step = len(tap_offsets) * V
    cells = OH * OW * V
    kb = 0
    while kb < blocks:
        pair = len(block_pass) == 2 and kb + 1 < blocks  # constant-folded for one block
        w0 = kb * block_step + t0 * V
        acc = tile_load(dW, w0, V, rows, _ONE, lanes)
        if pair:
            acc2 = tile_load(dW, w0 + block_step, V, rows, _ONE, lanes)
            for oy in range(OH):
                d0 = (kb * OH + oy) * OW * V
                p0 = start + oy * in_w
                for ox in range(OW):
                    d = tile_load(dT, d0 + ox * V, 0, _ONE, _ONE, lanes)
                    d2 = tile_load(dT, d0 + cells + ox * V, 0, _ONE, _ONE, lanes)
                    acc = tile_gather_fma(acc, d, packed, p0 + ox, tap_offsets, t0)
                    acc2 = tile_gather_fma(acc2, d2, packed, p0 + ox, tap_offsets, t0)
            tile_store(dW, w0 + block_step, V, acc2)
        else:
            for oy in range(OH):
                d0 = (kb * OH + oy) * OW * V
                p0 = start + oy * in_w
                for ox in range(OW):
                    d = tile_load(dT, d0 + ox * V, 0, _ONE, _ONE, lanes)
                    acc = tile_gather_fma(acc, d, packed, p0 + ox, tap_offsets, t0)
        tile_store(dW, w0, V, acc)
        kb += 2 if pair else 1


@_inlined
def _weight_gradient(packed, start, C, c0, in_h, in_w, dT, blocks, OH, OW, fh, fw, dW, rows, block_pass, lanes):
    """dW (blocks, C, fh, fw, lanes) += one image's products of dT and its padded planes (from ``start``).

    A tile holds one accumulator per input channel c0, c0 + 1, ...
    With ``block_pass`` a token of 2, two blocks of output channels go
    through one pass over the pixels, each x value loaded feeding both;
    every sum is the same.
    """
    V = len(lanes)
    in_plane = in_h * in_w
    x_step, w_step, columns = in_plane, fh * fw * V, fw
    block_step = C * fh * fw * V
    cells = OH * OW * V
    kb = 0
    while kb < blocks:
        pair = len(block_pass) == 2 and kb + 1 < blocks  # constant-folded for one block
        for ky in range(fh):
            for kx in range(columns):
                w0 = (((kb * C + c0) * fh + ky) * fw + kx) * V
                acc = tile_load(dW, w0, w_step, rows, _ONE, lanes)
                if pair:
                    acc2 = tile_load(dW, w0 + block_step, w_step, rows, _ONE, lanes)
                    for oy in range(OH):
                        d0 = (kb * OH + oy) * OW * V
                        p0 = start + c0 * in_plane + (oy + ky) * in_w + kx
                        for ox in range(OW):
                            d = tile_load(dT, d0 + ox * V, 0, _ONE, _ONE, lanes)
                            d2 = tile_load(dT, d0 + cells + ox * V, 0, _ONE, _ONE, lanes)
                            acc = tile_outer_fma(acc, d, packed, p0 + ox, x_step)
                            acc2 = tile_outer_fma(acc2, d2, packed, p0 + ox, x_step)
                    tile_store(dW, w0 + block_step, w_step, acc2)
                else:
                    for oy in range(OH):
                        d0 = (kb * OH + oy) * OW * V
                        p0 = start + c0 * in_plane + (oy + ky) * in_w + kx
                        for ox in range(OW):
                            d = tile_load(dT, d0 + ox * V, 0, _ONE, _ONE, lanes)
                            acc = tile_outer_fma(acc, d, packed, p0 + ox, x_step)
                tile_store(dW, w0, w_step, acc)
        kb += 2 if pair else 1


@_kernel
def weight_gradient_groups(packed, dout, mask, dW, db, dx, weights_t, zeros, counter, group_bounds, image_step, C, fh,
                           fw, in_h, in_w, c_sizes, c_repeats, tap_offsets, block_pass, lanes, dx_pass, dT,
                           planes, grid):
    """One thread's share of backward-weights: image groups taken from ``counter`` until none is left.

    Group g (images group_bounds[g] to group_bounds[g + 1], in order) sums
    into dW[g] (blocks, C, fh, fw, lanes) and db[g] (float64). ``packed``
    holds forward's padded planes, ``image_step`` elements per image. The
    input channels are cut into tiles: c_repeats[i] tiles of len(c_sizes[i])
    channels for each i, in order. Unless ``tap_offsets`` is None (one
    input channel: each filter tap's position in a padded plane), the tiles
    cut the filter taps instead. ``block_pass``: a token of the blocks of
    output channels in a pass, 1 or 2 (see ``_weight_gradient``). ``mask``:
    empty, or a fused ReLU's output (flat): dout counts as zero where the
    ReLU is off (``relu_off``). Each image's dout is transposed into the thread's ``dT``, its
    channel sums go to db, and dW is computed from dT.

    Unless ``dx_pass`` is None, each image's dx follows, from the same
    dout while it is in cache: the grid pass ``dx_pass`` (borders,
    filter_h and filter_w tokens, in_h, in_w, grid_tiles, k_tile and vectors
    tokens, as ``convolve_images`` takes them) with the transposed and
    flipped filters ``weights_t``, the thread's ``planes`` and ``grid``.
    """
    _, K, OH, OW = dout.shape
    V = len(lanes)
    blocks = (K + V - 1) // V
    zero_one = np.arange(2).astype(dout.dtype)
    lane_sums = np.empty(V, dtype=dout.dtype)
    fp = flush_subnormals()
    g = take_next(counter)
    while g < len(group_bounds) - 1:
        dW_group = dW[g]
        db_group = db[g]
        dW_group[:] = 0
        db_group[:] = 0
        for n in range(group_bounds[g], group_bounds[g + 1]):
            _transpose_gradient(dout, mask, n, blocks, lanes, dT)
            _channel_sums(dT, blocks, OH * OW, K, lanes, zero_one, lane_sums, db_group)
            c0 = 0  # the tile's first input channel, or with tap_offsets its first tap
            i = 0
            for c_tile in literal_unroll(c_sizes):  # tiles of different sizes are different types
                for _ in range(c_repeats[i]):
                    if tap_offsets is not None:  # pruned when compiled for None
                        _weight_gradient_taps(packed, n * image_step, in_w, dT, blocks, OH, OW, dW_group, c0, c_tile,
                                              tap_offsets, block_pass, lanes)
                    else:
                        _weight_gradient(packed, n * image_step, C, c0, in_h, in_w, dT, blocks, OH, OW, fh, fw,
                                         dW_group, c_tile, block_pass, lanes)
                    c0 += len(c_tile)
                i += 1  # noqa: SIM113  (literal_unroll loops cannot enumerate)
            if dx_pass is not None:  # pruned when compiled for a None dx_pass
                border_h, border_w, filter_h, filter_w, dx_in_h, dx_in_w, grid_tiles, k_tile, vectors = dx_pass
                _grid_image(dout, mask, n, weights_t, zeros, dx, n, 0, planes.size, border_h, border_w,
                            filter_h, filter_w, dx_in_h, dx_in_w, grid_tiles, k_tile, vectors, lanes, False, False,
                            planes, grid)
        g = take_next(counter)
    restore_fp(fp)


def channel_tile_runs(channel_tiles, taps, most_rows):
    """fastconv._plan's channel tiles as runs of one size: (a token per size, the number of tiles of each,
    whether the tiles cut the ``taps`` filter taps instead: for one input channel). Tiles of more than
    ``most_rows`` rows are cut into tiles of that many (each row's sum stays the same)."""
    one_channel = channel_tiles == ((0, 1),)
    if one_channel:
        channel_tiles = ((0, taps),)
    sizes, repeats = [], []
    counts = [piece for _, count in channel_tiles
              for piece in [most_rows] * (count // most_rows) + ([count % most_rows] if count % most_rows else [])]
    for count in counts:
        if sizes and len(sizes[-1]) == count:
            repeats[-1] += 1
        else:
            sizes.append(token(count))
            repeats.append(1)
    return tuple(sizes), np.array(repeats, dtype=np.int64), one_channel


def tap_offsets(filter_h, filter_w, in_w):
    """Each filter tap's position in a padded plane of width ``in_w``, tap by tap (ky, then kx)."""
    return np.array([ky * in_w + kx for ky in range(filter_h) for kx in range(filter_w)], dtype=np.int64)


def weight_gradient_to_nchw(dW_sum, filters):
    """dW (blocks, C, fh, fw, lanes) summed over groups, as (K, C, fh, fw) filters."""
    blocks, C, fh, fw, lanes = dW_sum.shape
    return np.ascontiguousarray(dW_sum.transpose(0, 4, 1, 2, 3).reshape(blocks * lanes, C, fh, fw)[:filters])
