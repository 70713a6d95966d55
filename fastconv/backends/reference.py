"""The reference backend: the book's math in plain NumPy.

This is the source of truth every fast backend is tested against. It is kept
readable on purpose; do not optimize it. float64 input gives bit-for-bit the
numbers of the book's code; float32 stays float32 (the book upcasts).
"""
from types import SimpleNamespace

import numpy as np

NAME = "reference"


def _out_size(size, window, stride, pad):
    return (size + 2 * pad - window) // stride + 1


def im2col(x, filter_h, filter_w, stride, pad):
    N, C, H, W = x.shape
    out_h = _out_size(H, filter_h, stride, pad)
    out_w = _out_size(W, filter_w, stride, pad)
    img = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)], mode="constant")
    col = np.zeros((N, C, filter_h, filter_w, out_h, out_w), dtype=x.dtype)
    # For each position (ky, kx) inside the filter, take the pixel that
    # position sees in every window at once: a strided slice of the image.
    for ky in range(filter_h):
        y_end = ky + stride * out_h
        for kx in range(filter_w):
            x_end = kx + stride * out_w
            col[:, :, ky, kx, :, :] = img[:, :, ky:y_end:stride, kx:x_end:stride]
    # rows (n, y, x), columns (c, ky, kx)
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(N * out_h * out_w, -1)


def col2im(col, x_shape, filter_h, filter_w, stride, pad):
    N, C, H, W = x_shape
    out_h = _out_size(H, filter_h, stride, pad)
    out_w = _out_size(W, filter_w, stride, pad)
    col = col.reshape(N, out_h, out_w, C, filter_h, filter_w).transpose(0, 3, 4, 5, 1, 2)
    # stride - 1 spare rows/columns keep every slice end inside the array
    img = np.zeros((N, C, H + 2 * pad + stride - 1, W + 2 * pad + stride - 1), dtype=col.dtype)
    for ky in range(filter_h):
        y_end = ky + stride * out_h
        for kx in range(filter_w):
            x_end = kx + stride * out_w
            img[:, :, ky:y_end:stride, kx:x_end:stride] += col[:, :, ky, kx, :, :]
    return img[:, :, pad:H + pad, pad:W + pad]


def conv_forward(x, W, b, stride, pad, workspace, relu=False, for_backward=True):
    FN, C, FH, FW = W.shape
    N, _, H, Wd = x.shape
    out_h = _out_size(H, FH, stride, pad)
    out_w = _out_size(Wd, FW, stride, pad)
    col = im2col(x, FH, FW, stride, pad)
    col_W = W.reshape(FN, -1).T
    out = np.dot(col, col_W) + b
    out = out.reshape(N, out_h, out_w, -1).transpose(0, 3, 1, 2)
    if relu:  # the book's ReLU layer on the output
        out, _ = relu_forward(out)
    cache = SimpleNamespace(x=x, col=col, col_W=col_W, stride=stride, pad=pad,
                            x_shape=x.shape, dtype=x.dtype, out_hw=(out_h, out_w))
    return out, cache


def conv_backward(dout, cache, W, relu_out=None, input_gradient=True):
    if relu_out is not None:  # the book's ReLU layer's backward first
        dout = relu_backward(dout.copy(), relu_out <= 0)
    FN, C, FH, FW = W.shape
    col_W = W.reshape(FN, -1).T
    dout = dout.transpose(0, 2, 3, 1).reshape(-1, FN)
    db = np.sum(dout, axis=0)
    dW = np.dot(cache.col.T, dout)
    dW = dW.transpose(1, 0).reshape(FN, C, FH, FW)
    if not input_gradient:
        return None, dW, db
    dcol = np.dot(dout, col_W.T)
    dx = col2im(dcol, cache.x_shape, FH, FW, cache.stride, cache.pad)
    return dx, dW, db


def conv_relu_pool_forward(x, W, b, stride, pad, pool_h, pool_w, pool_stride, pool_pad, workspace):
    out, cache = conv_forward(x, W, b, stride, pad, workspace, True, False)
    return maxpool_forward(out, pool_h, pool_w, pool_stride, pool_pad, None)[0], cache


def maxpool_forward(x, pool_h, pool_w, stride, pad, workspace):
    N, C, H, W = x.shape
    out_h = _out_size(H, pool_h, stride, pad)
    out_w = _out_size(W, pool_w, stride, pad)
    # Pad with -inf so that padded cells never win the max.
    padded = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)], mode="constant", constant_values=-np.inf)
    col = im2col(padded, pool_h, pool_w, stride, 0)
    col = col.reshape(-1, pool_h * pool_w)  # one window of one channel per row
    arg_max = np.argmax(col, axis=1)  # the first maximum wins ties
    out = np.max(col, axis=1)
    out = out.reshape(N, out_h, out_w, C).transpose(0, 3, 1, 2)
    cache = SimpleNamespace(x=x, arg_max=arg_max, pool_h=pool_h, pool_w=pool_w, stride=stride, pad=pad,
                            padded_shape=padded.shape, x_shape=x.shape, dtype=x.dtype, out_hw=(out_h, out_w))
    return out, cache


def maxpool_backward(dout, cache):
    N, C, H, W = cache.x_shape
    pool_size = cache.pool_h * cache.pool_w
    dout = dout.transpose(0, 2, 3, 1)
    dmax = np.zeros((dout.size, pool_size), dtype=dout.dtype)
    dmax[np.arange(cache.arg_max.size), cache.arg_max.flatten()] = dout.flatten()
    dmax = dmax.reshape(dout.shape + (pool_size,))
    dcol = dmax.reshape(dmax.shape[0] * dmax.shape[1] * dmax.shape[2], -1)
    dpadded = col2im(dcol, cache.padded_shape, cache.pool_h, cache.pool_w, cache.stride, 0)
    pad = cache.pad
    return dpadded[:, :, pad:pad + H, pad:pad + W]


def relu_forward(x):
    mask = x <= 0
    out = x.copy()
    out[mask] = 0
    return out, mask


def relu_backward(dout, mask):
    dout[mask] = 0
    return dout


def affine_forward(x, W, b):
    return np.dot(x, W) + b


def affine_backward(dout, x, W):
    dx = np.dot(dout, W.T)
    dW = np.dot(x.T, dout)
    db = np.sum(dout, axis=0)
    return dx, dW, db
