"""Input validation shared by every backend.

The kernel interface runs these checks before any backend touches memory, so
a wrong shape, dtype, stride or pad is a clear ``TypeError``/``ValueError``
naming the argument, whichever backend is active.
"""
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Sizes, strides and pads reach compiled loops as C ints.
MAX_INT = 2**31 - 1

# Max pooling records where each maximum came from as an int32 index into its image plane.
MAX_POOL_PLANE = 2**31


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


def bounded_int(name, value, least):
    """``value`` as an int in [least, MAX_INT]; bools and non-integers are a TypeError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    if value > MAX_INT:
        raise ValueError(f"{name} must be at most {MAX_INT}, got {value}")
    return int(value)


def positive_int(name, value):
    return bounded_int(name, value, 1)


def non_negative_int(name, value):
    return bounded_int(name, value, 0)


def output_size(size, window, stride, pad, what="input"):
    """Output length of a sliding window; ValueError when no window fits."""
    out = (size + 2 * pad - window) // stride + 1
    if size + 2 * pad < window or out < 1:
        raise ValueError(
            f"window of size {window} does not fit the {what} of size {size} with pad {pad}: "
            f"output size would be {out}"
        )
    return out


def relu_mask(y):
    """Where a ReLU is off, the book's mask: ``y <= 0``, True there. A NaN compares False, so a NaN passes
    through the ReLU and so does its gradient. The fast kernels state this rule once in each language
    (``fc_relu_off`` in C, ``relu_off`` in numba)."""
    return y <= 0


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
    """A validated NCHW shape tuple of ints: N and C >= 0, H and W >= 1."""
    try:
        entries = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of 4 ints, got {shape!r}") from None
    if any(isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral) for s in entries):
        raise TypeError(f"{name} must be a tuple of 4 ints, got {shape!r}")
    if len(entries) != 4:
        raise ValueError(f"{name} must be 4 sizes (N, C, H, W), got {entries}")
    shape = tuple(int(s) for s in entries)
    image_shape(name, shape)
    return shape


def image_shape(name, shape):
    """Check an NCHW shape: any number of images and channels (0 gives empty results), H and W >= 1."""
    if min(shape) < 0 or shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"{name} must have N, C >= 0 and H, W >= 1 (N, C, H, W), got {tuple(shape)}")
    for size in shape:
        if size > MAX_INT:
            raise ValueError(f"{name} sizes must be at most {MAX_INT}, got {tuple(shape)}")


def pool_plane(shape):
    """Check that max pooling can index every cell of an image plane."""
    if shape[2] * shape[3] > MAX_POOL_PLANE:
        raise ValueError(f"max pooling takes image planes of at most 2**31 cells (H*W), "
                         f"got H*W = {shape[2] * shape[3]} for x of shape {tuple(shape)}")


def bool_array(name, value, shape):
    array = np.asarray(value)
    if array.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {array.dtype}")
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {array.shape}")
    return np.ascontiguousarray(array)
