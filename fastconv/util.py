"""Helpers of the book's ``common.util``; im2col and col2im run on the active backend."""
import numpy as np

from fastconv.kernels import col2im, im2col

__all__ = ["im2col", "col2im", "conv_output_size", "shuffle_dataset", "smooth_curve"]


def conv_output_size(input_size, filter_size, stride=1, pad=0):
    """Output length of a convolution or pooling window sliding over ``input_size`` cells."""
    return (input_size + 2 * pad - filter_size) // stride + 1


def shuffle_dataset(x, t):
    """Shuffle samples and labels with one permutation (drawn from ``np.random``)."""
    permutation = np.random.permutation(x.shape[0])
    x = x[permutation, :] if x.ndim == 2 else x[permutation, :, :, :]
    return x, t[permutation]


def smooth_curve(x):
    """Smooth a loss curve with an 11-tap Kaiser window (beta 2), reflecting at the ends."""
    window_len = 11
    s = np.r_[x[window_len - 1:0:-1], x, x[-1:-window_len:-1]]
    w = np.kaiser(window_len, 2)
    y = np.convolve(w / w.sum(), s, mode="valid")
    return y[5:len(y) - 5]
