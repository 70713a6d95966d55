"""The numba backend's forward convolution kernels, which backward-data runs too.

The algorithm, the layouts and every size come from ``fastconv._plan``
(shared with the cython backend): a grid pass computes an output *grid* over
zero-padded input planes with a register tile of output channels x vectors
of grid positions, started from the bias (``convolve_images``); on small
planes the tile with output channels in the lanes instead
(``convolve_images_pixels``). Each kernel call is one thread's share of a
pass: it takes images from a shared counter until none is left, so which
thread runs an image never changes its arithmetic. Backward-data is the
same grid pass over ``dout`` (``_grid_image``, which the backward-weights
kernel of ``_numba_backward`` also runs inside its own loop). Layers whose
tiles have the same shape share one compiled specialization.

The tiles are those of ``_numba_simd``: sizes that must be known at compile
time (filter taps, tile rows and columns, lanes) arrive as tokens.
"""
import numpy as np
from numba import uint64 as _ix

from fastconv.backends._numba_kernels import _inlined, _kernel
from fastconv.backends._numba_simd import (_ONE, flush_subnormals, relu_gated, restore_fp, take_next, tile_gather_fma,
                                           tile_load, tile_outer_fma, tile_splat, tile_store)

@_inlined
def _copy_planes(src, mask, first, planes, src_h, src_w, dst, start, size, in_h, in_w, border_h, border_w):
    """Planes [first, first + planes) of ``src`` (flat, src_h x src_w planes) into in_h x in_w planes of
    ``dst`` from ``start``, at offset (border_h, border_w) (negative borders crop the source), with zeros
    everywhere else in dst[start:start + size] (each element written once). ``mask``: empty, or a fused
    ReLU's output of src's shape (flat), through which the copied values are gated (``relu_gated``)."""
    x_lo, x_hi = max(0, border_w), min(in_w, src_w + border_w)  # the columns of a plane row that are copied
    for p in range(planes):
        for row in range(in_h):
            d = start + (p * in_h + row) * in_w
            y = row - border_h
            if y < 0 or y >= src_h:
                for x in range(in_w):
                    dst[_ix(d + x)] = 0
                continue
            s = ((first + p) * src_h + y) * src_w - border_w
            for x in range(x_lo):
                dst[_ix(d + x)] = 0
            if mask.size:
                for x in range(x_lo, x_hi):
                    dst[_ix(d + x)] = relu_gated(src[_ix(s + x)], mask[_ix(s + x)])
            else:
                for x in range(x_lo, x_hi):
                    dst[_ix(d + x)] = src[_ix(s + x)]
            for x in range(x_hi, in_w):
                dst[_ix(d + x)] = 0
    for i in range(planes * in_h * in_w, size):  # the tail the last grid tiles may read
        dst[_ix(start + i)] = 0


@_inlined
def _grid_pass(planes, start, in_channels, in_h, in_w, weights, bias, kb, fh, fw, grid_tiles, grid, k_tile, vectors,
               lanes):
    """grid[(k, q)] = bias[kb*K + k] + sum over (c, ky, kx) of weights * planes[c, q + ky*in_w + kx], for the
    K = len(k_tile) channels of block kb and grid_tiles * len(vectors) * len(lanes) positions q."""
    K = len(k_tile)
    width = len(vectors) * len(lanes)
    grid_padded = grid_tiles * width
    in_plane = in_h * in_w
    for t in range(grid_tiles):
        q0 = t * width
        acc = tile_splat(bias, kb * K, k_tile, vectors, lanes)
        for c in range(in_channels):
            plane = start + c * in_plane + q0
            for ky in range(fh):
                for kx in range(fw):
                    inputs = tile_load(planes, plane + ky * in_w + kx, 0, _ONE, vectors, lanes)
                    acc = tile_outer_fma(acc, inputs, weights, (((kb * in_channels + c) * fh + ky) * fw + kx) * K, 1)
        tile_store(grid, q0, grid_padded, acc)


@_inlined
def _max4(a, b, c, d):
    """The largest of a window's four cells, a NaN if any is one (as the book's pooling gives it)."""
    m = a
    if b > m or b != b:
        m = b
    if c > m or c != c:
        m = c
    if d > m or d != d:
        m = d
    return m


@_inlined
def _grid_to_nchw(grid, grid_padded, in_w, k0, out, n, relu, pooled):
    """out[n, k0 + k] = the kept positions of grid row block k (the first out_w of every in_w), through a
    ReLU with ``relu``; with ``pooled``, their 2 x 2 max pooling (stride 2) instead."""
    _, K, OH, OW = out.shape
    flat = out.reshape(-1)
    for k in range(min(K - k0, grid.size // grid_padded)):
        for oy in range(OH):
            d = ((n * K + k0 + k) * OH + oy) * OW
            if pooled:
                s = k * grid_padded + 2 * oy * in_w
                for x in range(OW):
                    i = s + 2 * x
                    m = _max4(grid[_ix(i)], grid[_ix(i + 1)], grid[_ix(i + in_w)], grid[_ix(i + in_w + 1)])
                    flat[_ix(d + x)] = relu_gated(m, m) if relu else m
                continue
            s = k * grid_padded + oy * in_w
            for x in range(OW):
                v = grid[_ix(s + x)]
                flat[_ix(d + x)] = relu_gated(v, v) if relu else v  # the branch is moved out of the loop


@_kernel
def convolve_images(src, mask, weights, bias, out, counter, image_step, image_size, border_h, border_w, filter_h, filter_w,
                    in_h, in_w, grid_tiles, k_tile, vectors, lanes, relu, pooled, planes, grid):
    """One thread's share of a grid pass over a batch: images taken from ``counter`` until none is left.

    Image n of ``src`` (N, C, h, w), masked by ``mask`` (see ``_copy_planes``),
    is copied into zero-padded planes at
    ``planes[n * image_step:]`` (``image_size`` elements with the tail) and
    convolved with packed ``weights`` (the layouts of fastconv._plan) and
    ``bias`` (padded to whole channel blocks), one block of len(k_tile)
    output channels at a time into the thread's ``grid``, whose kept
    positions are copied to out[n] (NCHW) through a ReLU with ``relu``, or
    with ``pooled`` (inference) max-pooled 2 x 2 into out[n], which then has
    the pooled shape. Forward keeps every image's planes (``image_step`` =
    ``image_size``) for backward; backward-data reuses one thread-private
    image (``image_step`` = 0).
    """
    fp = flush_subnormals()
    n = take_next(counter)
    while n < src.shape[0]:
        _grid_image(src, mask, n, weights, bias, out, n, n * image_step, image_size, border_h, border_w, filter_h,
                    filter_w, in_h, in_w, grid_tiles, k_tile, vectors, lanes, relu, pooled, planes, grid)
        n = take_next(counter)
    restore_fp(fp)


@_inlined
def _grid_image(src, mask, m, weights, bias, out, n, start, image_size, border_h, border_w, filter_h, filter_w, in_h,
                in_w, grid_tiles, k_tile, vectors, lanes, relu, pooled, planes, grid):
    """Image m of ``src`` through the grid pass into out[n] (see ``convolve_images``), its planes at
    planes[start:]."""
    _, C, H, W = src.shape
    K = out.shape[1]
    fh, fw = len(filter_h), len(filter_w)  # compile-time: the taps' loops are unrolled
    grid_padded = grid_tiles * len(vectors) * len(lanes)
    _copy_planes(src.reshape(-1), mask, m * C, C, H, W, planes, start, image_size, in_h, in_w, border_h, border_w)
    for kb in range((K + len(k_tile) - 1) // len(k_tile)):
        _grid_pass(planes, start, C, in_h, in_w, weights, bias, kb, fh, fw, grid_tiles, grid, k_tile, vectors, lanes)
        _grid_to_nchw(grid, grid_padded, in_w, kb * len(k_tile), out, n, relu, pooled)


@_inlined
def _pixel_pass(planes, start, in_channels, in_plane, in_w, weights, bias, kb, fh, fw, grid_tiles, offsets, T,
                c_chunk, k_vectors, pixels, lanes):
    """T[(q, k)] = bias[kb*K + k] + sum over (c, ky, kx) of weights * planes[c, q's input + ky*in_w + kx], for
    the K = len(k_vectors) * len(lanes) channels of block kb and grid_tiles * len(pixels) pixels q (the
    channels-in-lanes tile; ``offsets[q]``: pixel q's input position in a plane). Input channels are
    taken ``c_chunk`` at a time, each chunk's weights staying in the L1 cache over all the tiles."""
    K = len(k_vectors) * len(lanes)
    P = len(pixels)
    for c0 in range(0, in_channels, c_chunk):
        for t in range(grid_tiles):
            q0 = t * P
            if c0 == 0:
                acc = tile_load(bias, kb * K, 0, pixels, k_vectors, lanes)
            else:
                acc = tile_load(T, q0 * K, K, pixels, k_vectors, lanes)
            for c in range(c0, min(c0 + c_chunk, in_channels)):
                plane = start + c * in_plane
                for ky in range(fh):
                    for kx in range(fw):
                        w0 = (((kb * in_channels + c) * fh + ky) * fw + kx) * K
                        acc = tile_gather_fma(acc, tile_load(weights, w0, 0, _ONE, k_vectors, lanes), planes,
                                              plane + ky * in_w + kx, offsets, q0)
            tile_store(T, q0 * K, K, acc)


@_inlined
def _pixels_to_nchw(T, K_tile, k0, conv_w, out, n, relu, pooled):
    """out[n, k0 + k] = column k of T (pixels of a conv_w wide output, K_tile), through a ReLU with
    ``relu``; with ``pooled``, its 2 x 2 max pooling (stride 2) instead."""
    _, K, OH, OW = out.shape
    flat = out.reshape(-1)
    cells = OH * OW
    channels = min(K - k0, K_tile)
    if pooled:
        for oy in range(OH):
            for ox in range(OW):
                i = (2 * oy * conv_w + 2 * ox) * K_tile
                j = i + conv_w * K_tile
                d = (n * K + k0) * cells + oy * OW + ox
                for k in range(channels):  # along T's rows
                    m = _max4(T[_ix(i + k)], T[_ix(i + K_tile + k)], T[_ix(j + k)], T[_ix(j + K_tile + k)])
                    flat[_ix(d + k * cells)] = relu_gated(m, m) if relu else m
        return
    for k in range(channels):
        d = (n * K + k0 + k) * cells
        for q in range(cells):
            v = T[_ix(q * K_tile + k)]
            flat[_ix(d + q)] = relu_gated(v, v) if relu else v


@_kernel
def convolve_images_pixels(src, mask, weights, bias, out, counter, image_step, image_size, border_h, border_w, filter_h,
                           filter_w, in_h, in_w, grid_tiles, offsets, out_w, c_chunk, k_vectors, pixels, lanes, relu,
                           pooled, planes, T):
    """``convolve_images`` with the channels-in-lanes tile: a block's results go to the thread's ``T``
    (pixels, channels) and are transposed into out[n]. ``offsets``: ``pixel_offsets``; ``out_w``: the
    convolution's output width (which a pooled ``out`` does not show)."""
    N, C, H, W = src.shape
    K = out.shape[1]
    fh, fw = len(filter_h), len(filter_w)
    K_tile = len(k_vectors) * len(lanes)
    flat = src.reshape(-1)
    fp = flush_subnormals()
    n = take_next(counter)
    while n < N:
        start = n * image_step
        _copy_planes(flat, mask, n * C, C, H, W, planes, start, image_size, in_h, in_w, border_h, border_w)
        for kb in range((K + K_tile - 1) // K_tile):
            _pixel_pass(planes, start, C, in_h * in_w, in_w, weights, bias, kb, fh, fw, grid_tiles, offsets, T,
                        c_chunk, k_vectors, pixels, lanes)
            _pixels_to_nchw(T, K_tile, kb * K_tile, out_w, out, n, relu, pooled)
        n = take_next(counter)
    restore_fp(fp)


def pixel_offsets(tile_pass):
    """Each pixel's input position in a padded plane, for the channels-in-lanes tile's pixels (those past
    the last repeat it)."""
    q = np.minimum(np.arange(tile_pass.grid_padded), tile_pass.out_h * tile_pass.out_w - 1)
    return (q // tile_pass.out_w * tile_pass.in_w + q % tile_pass.out_w).astype(np.int64)
