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

Two layouts of the window matrix appear here:

- the book's ``col``: shape (N*out_h*out_w, C*fh*fw), one window per row;
- ``colT``, the transpose for images [n0, n1): shape
  (C*fh*fw, (n1-n0)*out_h*out_w). Its row for one filter tap (c, ky, kx)
  holds what that tap sees in every window: for stride 1 a sequence of
  shifted image rows, cheap to fill and to fold back.
"""
import warnings

import numpy as np
from numba import njit
from numba import uint64 as _ix

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


@_inlined
def im2col_t_same_size(x, fh, fw, pad, colT, n0, n1, oy0, oy1):
    """colT[(c, ky, kx), (n - n0, oy - oy0, ox)] = x[n, c, oy - pad + ky, ox - pad + kx] (0 in the padding)
    for output lines [oy0, oy1), when the output has the input's size (stride 1, pad = (f - 1) / 2).

    Then a tap's view of an image is the image shifted by a constant offset:
    one long copy per tap and image, after which the columns that wrapped
    around from the neighbouring row are zeroed.
    """
    _, C, H, W = x.shape
    hw = H * W
    cells = (oy1 - oy0) * W  # of one image in a row of colT
    width = colT.shape[1]
    src = x.reshape(-1)
    dst = colT.reshape(-1)
    for c in range(C):
        for ky in range(fh):
            # lines [oy_lo, oy_hi) of the range, and columns [lo, hi), see the image, not the padding
            oy_lo, oy_hi = _valid_span(H, H, ky, 1, pad)
            oy_lo = min(max(oy_lo, oy0), oy1)
            oy_hi = max(min(oy_hi, oy1), oy_lo)
            for kx in range(fw):
                lo, hi = _valid_span(W, W, kx, 1, pad)
                shift = (ky - pad) * W + (kx - pad)
                # cells [j_lo, j_hi) of the image's block are copied, the rest of [oy0*W, oy1*W) is padding
                j_lo = min(max(oy_lo * W, -shift), oy1 * W)
                j_hi = max(min(oy_hi * W, hw - shift), j_lo)
                row = ((c * fh + ky) * fw + kx) * width
                for i in range(n1 - n0):
                    d = row + i * cells - oy0 * W  # cell j of the image goes to d + j
                    s = ((n0 + i) * C + c) * hw + shift
                    for j in range(oy0 * W, j_lo):
                        dst[_ix(d + j)] = 0
                    for j in range(j_hi - j_lo):
                        dst[_ix(d + j_lo + j)] = src[_ix(s + j_lo + j)]
                    for j in range(j_hi, oy1 * W):
                        dst[_ix(d + j)] = 0
                    if lo > 0 or hi < W:
                        for oy in range(oy_lo, oy_hi):
                            for ox in range(lo):
                                dst[_ix(d + oy * W + ox)] = 0
                            for ox in range(hi, W):
                                dst[_ix(d + oy * W + ox)] = 0


@_inlined
def im2col_t_padded(x, fh, fw, stride, pad, colT, n0, n1, oy0, oy1, plane):
    """colT[(c, ky, kx), (n - n0, oy - oy0, ox)] = x[n, c, oy*stride - pad + ky, ox*stride - pad + kx], 0 in
    the padding, for output lines [oy0, oy1) and any geometry, through a zero-padded copy of each image plane.

    ``plane`` is scratch of (H + 2*pad) * (W + 2*pad) elements. With the
    padding in place every window line is a plain (strided) copy with no
    bounds to work out: faster on small planes, where the bounds and zeroing
    of the other kernels cost more than the copying. Only the input rows that
    the lines read are copied into it.
    """
    _, C, H, W = x.shape
    Hp = H + 2 * pad
    Wp = W + 2 * pad
    out_w = (Wp - fw) // stride + 1
    cells = (oy1 - oy0) * out_w
    width = colT.shape[1]
    y_first = max(oy0 * stride - pad, 0)
    y_end = min((oy1 - 1) * stride - pad + fh, H)
    src = x.reshape(-1)
    dst = colT.reshape(-1)
    padded = plane.reshape(-1)
    for j in range(Hp * Wp):  # the border stays 0; the interior is overwritten plane by plane
        padded[_ix(j)] = 0
    for i in range(n1 - n0):
        for c in range(C):
            s = ((n0 + i) * C + c) * H * W
            for y in range(y_first, y_end):
                for j in range(W):
                    padded[_ix((y + pad) * Wp + pad + j)] = src[_ix(s + y * W + j)]
            for ky in range(fh):
                for kx in range(fw):
                    d = ((c * fh + ky) * fw + kx) * width + i * cells
                    for oy in range(oy0, oy1):
                        q = (oy * stride + ky) * Wp + kx
                        e = d + (oy - oy0) * out_w
                        if stride == 1:
                            for j in range(out_w):
                                dst[_ix(e + j)] = padded[_ix(q + j)]
                        else:
                            for j in range(out_w):
                                dst[_ix(e + j)] = padded[_ix(q + j * stride)]


@_inlined
def col2im_t_padded(colT, fh, fw, stride, pad, dx, n0, n1, oy0, oy1, plane):
    """``col2im_t`` through a padded plane (scratch as in ``im2col_t_padded``), added into dx without its border."""
    _, C, H, W = dx.shape
    Hp = H + 2 * pad
    Wp = W + 2 * pad
    out_w = (Wp - fw) // stride + 1
    cells = (oy1 - oy0) * out_w
    width = colT.shape[1]
    py0 = oy0 * stride  # padded rows [py0, py1) receive the lines' taps
    py1 = (oy1 - 1) * stride + fh
    src = colT.reshape(-1)
    dst = dx.reshape(-1)
    padded = plane.reshape(-1)
    if oy0 == 0:
        _zero_images(dst, n0, n1, C * H * W)
    for i in range(n1 - n0):
        for c in range(C):
            for j in range(py0 * Wp, py1 * Wp):
                padded[_ix(j)] = 0
            for ky in range(fh):
                for kx in range(fw):
                    s = ((c * fh + ky) * fw + kx) * width + i * cells
                    for oy in range(oy0, oy1):
                        q = (oy * stride + ky) * Wp + kx
                        e = s + (oy - oy0) * out_w
                        if stride == 1:
                            for j in range(out_w):
                                padded[_ix(q + j)] += src[_ix(e + j)]
                        else:
                            for j in range(out_w):
                                padded[_ix(q + j * stride)] += src[_ix(e + j)]
            d = ((n0 + i) * C + c) * H * W
            for y in range(max(py0 - pad, 0), min(py1 - pad, H)):
                for j in range(W):
                    dst[_ix(d + y * W + j)] += padded[_ix((y + pad) * Wp + pad + j)]


@_inlined
def col2im_t(colT, fh, fw, stride, pad, dx, n0, n1, oy0, oy1):
    """dx[n0:n1] += the adjoint of unfolding output lines [oy0, oy1): every tap added back to its pixel,
    padding dropped. The images are zeroed first when the range starts at line 0.
    """
    _, C, H, W = dx.shape
    images = n1 - n0
    lines = oy1 - oy0
    width = colT.shape[1]
    out_w = (W + 2 * pad - fw) // stride + 1
    src = colT.reshape(-1)
    dst = dx.reshape(-1)
    if oy0 == 0:
        _zero_images(dst, n0, n1, C * H * W)
    for c in range(C):
        for ky in range(fh):
            for kx in range(fw):
                row = ((c * fh + ky) * fw + kx) * width
                lo, hi = _valid_span(out_w, W, kx, stride, pad)
                for i in range(images):
                    plane = ((n0 + i) * C + c) * H * W
                    for oy in range(oy0, oy1):
                        y = oy * stride - pad + ky
                        if y < 0 or y >= H:
                            continue
                        s = row + (i * lines + oy - oy0) * out_w + lo
                        d = plane + y * W + lo * stride + kx - pad
                        if stride == 1:
                            for j in range(hi - lo):
                                dst[_ix(d + j)] += src[_ix(s + j)]
                        else:
                            for j in range(hi - lo):
                                dst[_ix(d + j * stride)] += src[_ix(s + j)]


@_kernel
def im2col_rows(x, fh, fw, stride, pad, col, n0, n1):
    """The book's ``col`` rows of images [n0, n1): col[(n, oy, ox), (c, ky, kx)]."""
    _, C, H, W = x.shape
    out_h = (H + 2 * pad - fh) // stride + 1
    out_w = (W + 2 * pad - fw) // stride + 1
    src = x.reshape(-1)
    dst = col.reshape(-1)
    taps = C * fh * fw
    for n in range(n0, n1):
        for oy in range(out_h):
            for ox in range(out_w):
                d = ((n * out_h + oy) * out_w + ox) * taps
                lo = min(max(pad - ox * stride, 0), fw)  # taps kx in [lo, hi) fall inside the image
                hi = max(min(W + pad - ox * stride, fw), lo)
                for c in range(C):
                    for ky in range(fh):
                        y = oy * stride - pad + ky
                        e = d + (c * fh + ky) * fw
                        if y < 0 or y >= H:
                            for kx in range(fw):
                                dst[_ix(e + kx)] = 0
                            continue
                        s = ((n * C + c) * H + y) * W + ox * stride - pad
                        for kx in range(lo):
                            dst[_ix(e + kx)] = 0
                        for kx in range(lo, hi):
                            dst[_ix(e + kx)] = src[_ix(s + kx)]
                        for kx in range(hi, fw):
                            dst[_ix(e + kx)] = 0


@_kernel
def col2im_rows(col, fh, fw, stride, pad, dx, n0, n1):
    """dx[n0:n1] = the adjoint of ``im2col_rows`` (taps of overlapping windows are summed)."""
    _, C, H, W = dx.shape
    out_h = (H + 2 * pad - fh) // stride + 1
    out_w = (W + 2 * pad - fw) // stride + 1
    src = col.reshape(-1)
    dst = dx.reshape(-1)
    taps = C * fh * fw
    _zero_images(dst, n0, n1, C * H * W)
    for n in range(n0, n1):
        for oy in range(out_h):
            for ox in range(out_w):
                s = ((n * out_h + oy) * out_w + ox) * taps
                lo = max(pad - ox * stride, 0)
                hi = min(W + pad - ox * stride, fw)
                for c in range(C):
                    for ky in range(fh):
                        y = oy * stride - pad + ky
                        if y < 0 or y >= H:
                            continue
                        e = s + (c * fh + ky) * fw
                        d = ((n * C + c) * H + y) * W + ox * stride - pad
                        for kx in range(lo, hi):
                            dst[_ix(d + kx)] += src[_ix(e + kx)]


@_kernel
def im2col_lines(x, fh, fw, stride, pad, col, n0, n1):
    """The same rows as ``im2col_rows``, filled one output line and one tap at a time.

    The inner loop runs along the line's windows (stores ``taps`` apart), not
    along a filter row: faster when a window has few taps (the network's
    first layer: 9), slower when it has many.
    """
    _, C, H, W = x.shape
    out_h = (H + 2 * pad - fh) // stride + 1
    out_w = (W + 2 * pad - fw) // stride + 1
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
def col2im_lines(col, fh, fw, stride, pad, dx, n0, n1):
    """``col2im_rows`` in the loop order of ``im2col_lines``."""
    _, C, H, W = dx.shape
    out_h = (H + 2 * pad - fh) // stride + 1
    out_w = (W + 2 * pad - fw) // stride + 1
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
def add_bias_to_nchw(rows, b, out, n0, n1):
    """out[n, f, :] = rows[f, (n - n0) block] + b[f] for images [n0, n1); ``rows`` is (F, (n1-n0)*hw).

    ``rows`` may be ``out[n0]`` itself (one image): each cell is read before it is written.
    """
    _, F, hw = out.shape
    width = rows.shape[1]
    src = rows.reshape(-1)
    dst = out.reshape(-1)
    for i in range(n1 - n0):
        for f in range(F):
            s = f * width + i * hw
            d = ((n0 + i) * F + f) * hw
            bias = b[f]
            for p in range(hw):
                dst[_ix(d + p)] = src[_ix(s + p)] + bias


@_inlined
def row_sum(flat, start, count):
    """flat[start:start + count].sum() in float64, with four running sums: independent additions pipeline."""
    t0 = t1 = t2 = t3 = 0.0
    p = 0
    while p + 4 <= count:
        t0 += flat[_ix(start + p)]
        t1 += flat[_ix(start + p + 1)]
        t2 += flat[_ix(start + p + 2)]
        t3 += flat[_ix(start + p + 3)]
        p += 4
    for q in range(p, count):
        t0 += flat[_ix(start + q)]
    return (t0 + t1) + (t2 + t3)


@_inlined
def nchw_to_rows(dout, rows, db, n0, n1):
    """rows[f, (n - n0) block] = dout[n, f, :] for images [n0, n1), and db[f] += their sum.

    ``db`` is float64: the bias gradient then barely depends on how the batch
    is cut, and is at least as accurate as the reference's.
    """
    _, F, hw = dout.shape
    width = rows.shape[1]
    src = dout.reshape(-1)
    dst = rows.reshape(-1)
    for i in range(n1 - n0):
        for f in range(F):
            s = ((n0 + i) * F + f) * hw
            d = f * width + i * hw
            for p in range(hw):
                dst[_ix(d + p)] = src[_ix(s + p)]
            db[f] += row_sum(src, s, hw)


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
    """out = x where x > 0, else 0; mask = x <= 0; on the flat range [i0, i1)."""
    for j in range(i1 - i0):
        i = _ix(i0 + j)
        v = x[i]
        m = v <= 0
        mask[i] = m
        out[i] = 0 if m else v


@_kernel
def relu_backward(dout, mask, i0, i1):
    """dout = 0 where mask, in place, on the flat range [i0, i1)."""
    for j in range(i1 - i0):
        i = _ix(i0 + j)
        if mask[i]:
            dout[i] = 0
