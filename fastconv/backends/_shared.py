"""What the fast backends share beyond the plan: the state a max pooling leaves for its backward."""
import numpy as np


class PoolCache:
    """Where each pooling output took its maximum from; the book's ``arg_max`` on request.

    ``source`` has the output's shape (N, C, out_h, out_w) and holds ``y * W + x``
    of each window's maximum in its input plane, or -1 where a padded cell won
    (a window of padding only).
    """

    __slots__ = ("source", "pool_h", "pool_w", "stride", "pad", "x_shape", "dtype", "out_hw")

    def __init__(self, source, pool_h, pool_w, stride, pad, x_shape, dtype, out_hw):
        self.source = source
        self.pool_h = pool_h
        self.pool_w = pool_w
        self.stride = stride
        self.pad = pad
        self.x_shape = x_shape
        self.dtype = dtype
        self.out_hw = out_hw

    @property
    def arg_max(self):
        """The book's flat ``arg_max``: the window index ky*pool_w + kx of each maximum, in (n, y, x, c) order."""
        W = self.x_shape[3]
        out_h, out_w = self.out_hw
        source = self.source.reshape((self.x_shape[0], self.x_shape[1], out_h, out_w))
        y0 = np.arange(out_h)[:, None] * self.stride - self.pad
        x0 = np.arange(out_w)[None, :] * self.stride - self.pad
        k = (source // W - y0) * self.pool_w + (source % W - x0)
        k[source < 0] = 0  # a padded cell wins only as the window's first cell
        return k.transpose(0, 2, 3, 1).reshape(-1)
