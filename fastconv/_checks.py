"""Input validation shared by every backend.

The kernel interface runs these checks before any backend touches memory, so
a wrong shape, dtype, stride or pad is a clear ``TypeError``/``ValueError``
naming the argument, whichever backend is active.
"""
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(name, value, ndim=None, dtype=None):
    """``value`` as a C-contiguous float32/float64 array (cast to ``dtype`` if given)."""
    array = np.asarray(value)
    if dtype is None:
        if array.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a float32 or float64 array, got dtype {array.dtype}; "
                f"convert it first, e.g. {name}.astype(np.float32)"
            )
        dtype = array.dtype
    elif array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a numeric array, got dtype {array.dtype}")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=dtype)


def positive_int(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def non_negative_int(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def output_size(size, window, stride, pad, what="input"):
    """Output length of a sliding window; ValueError when no window fits."""
    out = (size + 2 * pad - window) // stride + 1
    if size + 2 * pad < window or out < 1:
        raise ValueError(
            f"window of size {window} does not fit the {what} of size {size} with pad {pad}: "
            f"output size would be {out}"
        )
    return out


def window_geometry(x_shape, filter_h, filter_w, stride, pad):
    """Validated (filter_h, filter_w, stride, pad, out_h, out_w) for an NCHW shape."""
    filter_h = positive_int("filter_h", filter_h)
    filter_w = positive_int("filter_w", filter_w)
    stride = positive_int("stride", stride)
    pad = non_negative_int("pad", pad)
    out_h = output_size(x_shape[2], filter_h, stride, pad, "height")
    out_w = output_size(x_shape[3], filter_w, stride, pad, "width")
    return filter_h, filter_w, stride, pad, out_h, out_w


def shape4(name, shape):
    """A validated NCHW shape tuple of positive ints."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of 4 ints, got {shape!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"{name} must be 4 positive sizes (N, C, H, W), got {shape}")
    return shape


def bool_array(name, value, shape):
    array = np.asarray(value)
    if array.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {array.dtype}")
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {array.shape}")
    return np.ascontiguousarray(array)
