"""Jitted loops of the numba backend.

Every kernel is serial and releases the GIL (``nogil=True``); the backend
runs several calls at once on disjoint ranges ``[n0, n1)`` of images (or of
elements), and a call writes only the part of its outputs that belongs to
its range. Kernels never validate: ``fastconv.kernels`` has done that. Arrays
arrive C-contiguous; the loops work on flat views of them.

Indices are converted to unsigned (``_ix``) where arrays are read or written:
a signed index makes Numba emit negative-index wraparound code, which stops
LLVM from vectorizing the loop (measured: 5 to 8 times slower copies).

Each kernel is compiled for a dtype the first time it is called with it,
and the machine code is cached on disk: next to this file when that is
writable, else in the user's cache directory (Numba's own fallback, e.g.
``~/.cache/numba`` for a read-only install), or in ``NUMBA_CACHE_DIR`` when
set. With no writable place at all the kernels still work, uncached.

The convolutions' kernels are in ``_numba_forward`` and ``_numba_backward``
(on the intrinsics of ``_numba_simd``); ``im2col_lines`` and ``col2im_lines``
make and fold the book's ``col`` (shape (N*out_h*out_w, C*fh*fw), one window
per row) for the kernel interface. Output sizes come from the caller
(``fastconv._checks.output_size``) or from the shapes of the arrays it
allocated.
"""
import warnings

import numpy as np
from numba import njit
from numba import uint64 as _ix

from fastconv.backends._numba_simd import relu_gated, relu_off

# error_model="numpy": no zero-division checks in the index arithmetic
_OPTIONS = {"nogil": True, "error_model": "numpy"}
_uncached = []  # names of the kernels compiled without a disk cache


def _kernel(function, **options):
    """``njit`` with the options above, caching compiled code on disk where possible."""
    options = {**_OPTIONS, **options}
    try:
        return njit(cache=True, **options)(function)
    except RuntimeError as exc:  # Numba found no writable cache directory
        if not _uncached:
            warnings.warn(f"fastconv's numba kernels will be compiled in every process: {exc}; "
                          "set NUMBA_CACHE_DIR to a writable directory to cache them", RuntimeWarning,
                          stacklevel=2)
        _uncached.append(function.__name__)
        return njit(**options)(function)


def _inlined(function):
    """``_kernel`` for a function that other kernels call: its code is inlined into theirs.

    A kernel compiled while its callee comes from the disk cache can only
    call the callee's machine code, not inline and optimize it with its own:
    measured, unfolding called from a convolution loop ran 3 times slower
    whenever the callee had been cached first. Inlined, every kernel's cached
    code is the same however the cache was filled.
    """
    return _kernel(function, inline="always")


@_inlined
def _valid_span(out_w, width, k, stride, pad):
    """Window columns [lo, hi) whose tap at offset ``k`` falls inside ``[0, width)`` (not in the padding)."""
    lo = 0
    if pad > k:
        lo = min((pad - k + stride - 1) // stride, out_w)
    hi = min((width - 1 + pad - k) // stride + 1, out_w)
    return lo, max(hi, lo)


@_inlined
def _zero_images(flat, n0, n1, image_size):
    """flat[n0*image_size : n1*image_size] = 0: the images of one range, before adding into them."""
    for j in range(n0 * image_size, n1 * image_size):
        flat[_ix(j)] = 0


@_kernel
def im2col_lines(x, fh, fw, stride, pad, out_h, out_w, col, n0, n1):
    """The book's ``col`` rows of images [n0, n1): col[(n, oy, ox), (c, ky, kx)] for out_h x out_w windows,
    filled one output line and one tap at a time (the inner loop runs along the line's windows, stores
    ``taps`` apart)."""
    _, C, H, W = x.shape
    src = x.reshape(-1)
    dst = col.reshape(-1)
    taps = C * fh * fw
    for n in range(n0, n1):
        for oy in range(out_h):
            line = (n * out_h + oy) * out_w * taps
            for c in range(C):
                for ky in range(fh):
                    y = oy * stride - pad + ky
                    for kx in range(fw):
                        e = line + (c * fh + ky) * fw + kx
                        if y < 0 or y >= H:
                            for ox in range(out_w):
                                dst[_ix(e + ox * taps)] = 0
                            continue
                        lo, hi = _valid_span(out_w, W, kx, stride, pad)
                        s = ((n * C + c) * H + y) * W - pad + kx
                        for ox in range(lo):
                            dst[_ix(e + ox * taps)] = 0
                        for ox in range(lo, hi):
                            dst[_ix(e + ox * taps)] = src[_ix(s + ox * stride)]
                        for ox in range(hi, out_w):
                            dst[_ix(e + ox * taps)] = 0


@_kernel
def col2im_lines(col, fh, fw, stride, pad, out_h, out_w, dx, n0, n1):
    """dx[n0:n1] = the adjoint of ``im2col_lines`` (taps of overlapping windows are summed)."""
    _, C, H, W = dx.shape
    src = col.reshape(-1)
    dst = dx.reshape(-1)
    taps = C * fh * fw
    _zero_images(dst, n0, n1, C * H * W)
    for n in range(n0, n1):
        for oy in range(out_h):
            line = (n * out_h + oy) * out_w * taps
            for c in range(C):
                for ky in range(fh):
                    y = oy * stride - pad + ky
                    if y < 0 or y >= H:
                        continue
                    for kx in range(fw):
                        e = line + (c * fh + ky) * fw + kx
                        lo, hi = _valid_span(out_w, W, kx, stride, pad)
                        d = ((n * C + c) * H + y) * W - pad + kx
                        for ox in range(lo, hi):
                            dst[_ix(d + ox * stride)] += src[_ix(e + ox * taps)]


@_inlined
def _inside_span(out_size, size, window, stride, pad):
    """Windows [lo, hi) along one axis that lie wholly inside ``[0, size)`` (no padding)."""
    lo = min((pad + stride - 1) // stride, out_size)
    hi = min(max((size + pad - window) // stride + 1, lo), out_size)
    return lo, hi


@_inlined
def _larger(v, at, best, best_at):
    """(v, at) if v > best, else (best, best_at), without a branch on the data."""
    take = v > best
    return (v if take else best), best_at + take * (at - best_at)


@_inlined
def _pool2x2_plane(src, plane, W, dst, where, first, out_h, out_w):
    """The book's pooling (2 x 2 windows, stride 2, no padding) of the plane at src[plane:], into
    dst[first:] and where[first:] as ``maxpool_forward`` gives them. A row's windows are searched with
    selects only (a loop that vectorizes); a row holding a NaN is searched again exactly."""
    for oy in range(out_h):
        row = 2 * oy * W
        o = first + oy * out_w
        nan_seen = False
        for ox in range(out_w):
            at = row + 2 * ox
            a = src[_ix(plane + at)]
            b = src[_ix(plane + at + 1)]
            c = src[_ix(plane + at + W)]
            d = src[_ix(plane + at + W + 1)]
            nan_seen |= (a != a) | (b != b) | (c != c) | (d != d)
            best, best_at = _larger(b, at + 1, a, at)
            best, best_at = _larger(c, at + W, best, best_at)
            best, best_at = _larger(d, at + W + 1, best, best_at)
            dst[_ix(o + ox)] = best
            where[_ix(o + ox)] = best_at
        if nan_seen:  # the first NaN of a window wins, as in np.argmax
            for ox in range(out_w):
                at = row + 2 * ox
                for cell in (at, at + 1, at + W, at + W + 1):
                    v = src[_ix(plane + cell)]
                    if v != v:
                        dst[_ix(o + ox)] = v
                        where[_ix(o + ox)] = cell
                        break


@_kernel
def maxpool_forward(x, ph, pw, stride, pad, out, source, n0, n1):
    """Window maxima of images [n0, n1) and where each came from.

    The search is np.argmax's over the window in (ky, kx) order, padded cells
    counting as -inf: the first cell starts it, then only a strictly larger
    value or the first NaN takes over. ``source`` (shaped like ``out``) gets
    the winner's index y*W + x in its image plane, or -1 for a padded cell
    (which can only win as the window's first cell, when nothing beats -inf).
    """
    _, C, H, W = x.shape
    out_h, out_w = out.shape[2], out.shape[3]
    src = x.reshape(-1)
    dst = out.reshape(-1)
    where = source.reshape(-1)
    if ph == 2 and pw == 2 and stride == 2 and pad == 0:
        for p in range(n0 * C, n1 * C):
            _pool2x2_plane(src, p * H * W, W, dst, where, p * out_h * out_w, out_h, out_w)
        return
    cells = ph * pw
    offset = np.empty(cells, dtype=np.intp)  # of cell k from the window's corner
    for ky in range(ph):
        for kx in range(pw):
            offset[ky * pw + kx] = ky * W + kx
    y_lo, y_hi = _inside_span(out_h, H, ph, stride, pad)
    x_lo, x_hi = _inside_span(out_w, W, pw, stride, pad)
    for n in range(n0, n1):
        for c in range(C):
            plane = (n * C + c) * H * W
            first = (n * C + c) * out_h * out_w
            for oy in range(out_h):
                y0 = oy * stride - pad
                for ox in range(out_w):
                    x0 = ox * stride - pad
                    inside = y_lo <= oy < y_hi and x_lo <= ox < x_hi
                    nan_seen = False
                    if inside:
                        # no branch on the data: which cell wins is random on real
                        # data, and mispredicted branches cost more than the search
                        corner = y0 * W + x0
                        best = src[_ix(plane + corner)]
                        best_at = corner
                        nan_seen = best != best
                        if cells == 4 and pw == 2:  # 2x2, the common case: unrolled
                            for at in (corner + 1, corner + W, corner + W + 1):
                                v = src[_ix(plane + at)]
                                best, best_at = _larger(v, at, best, best_at)
                                nan_seen |= v != v
                        else:
                            for k in range(1, cells):
                                at = corner + offset[k]
                                v = src[_ix(plane + at)]
                                best, best_at = _larger(v, at, best, best_at)
                                nan_seen |= v != v
                    if not inside or nan_seen:
                        # the exact search: padded cells are -inf, the first NaN wins
                        best = -np.inf
                        best_at = -1
                        for k in range(cells):
                            y = y0 + k // pw
                            xx = x0 + k % pw
                            if 0 <= y < H and 0 <= xx < W:
                                v = src[_ix(plane + y * W + xx)]
                                if k == 0 or (best == best and (v > best or v != v)):
                                    best = v
                                    best_at = y * W + xx
                    dst[_ix(first + oy * out_w + ox)] = best
                    where[_ix(first + oy * out_w + ox)] = best_at


@_kernel
def maxpool_backward(dout, source, dx, n0, n1):
    """dx[n0:n1]: each output gradient added to the cell its maximum came from (none for padding)."""
    _, C, H, W = dx.shape
    hw = H * W
    out_hw = dout.shape[2] * dout.shape[3]
    src = dout.reshape(-1)
    where = source.reshape(-1)
    dst = dx.reshape(-1)
    _zero_images(dst, n0, n1, C * hw)
    for plane in range(n0 * C, n1 * C):
        first = plane * out_hw
        for i in range(out_hw):
            at = where[_ix(first + i)]
            if at >= 0:
                dst[_ix(plane * hw + at)] += src[_ix(first + i)]


@_kernel
def relu_forward(x, out, mask, i0, i1):
    """mask = where the ReLU is off at x (x <= 0, ``relu_off``), out = x elsewhere and 0 there; on the flat
    range [i0, i1)."""
    for j in range(i1 - i0):
        i = _ix(i0 + j)
        v = x[i]
        m = relu_off(v)
        mask[i] = m
        out[i] = 0 if m else v


@_kernel
def relu_gradient(dout, relu_out, dx, i0, i1):
    """dx = dout gated by relu_out (the ReLU's backward from its output: ``relu_gated``), on the flat range
    [i0, i1)."""
    for j in range(i1 - i0):
        i = _ix(i0 + j)
        dx[i] = relu_gated(dout[i], relu_out[i])


@_kernel
def relu_backward(dout, mask, i0, i1):
    """dout = 0 where mask, in place, on the flat range [i0, i1)."""
    for j in range(i1 - i0):
        i = _ix(i0 + j)
        if mask[i]:
            dout[i] = 0
