"""The chapter-8 network's layer shapes and seeded input data, without fastconv.

Both sides of the benchmark use this module: the fastconv operations in
``_network`` and the PyTorch process of ``bench.torch_ops``, which must not
import fastconv. Shapes travel between processes as plain dicts
(``to_dict``/``from_dict``).
"""
import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

BATCH = 100
INPUT_SHAPE = (1, 28, 28)
INFERENCE_IMAGES = 10_000


def _fmt(shape):
    return "x".join(str(d) for d in shape)


@dataclass(frozen=True)
class ConvShape:
    name: str
    x_shape: tuple
    w_shape: tuple
    stride: int
    pad: int
    out_hw: tuple  # as the layer computes it (read from a forward pass, never recomputed here)

    @property
    def out_shape(self):
        return (self.x_shape[0], self.w_shape[0]) + self.out_hw

    @property
    def col_shape(self):
        n, c = self.x_shape[:2]
        oh, ow = self.out_hw
        return n * oh * ow, c * self.w_shape[2] * self.w_shape[3]

    @property
    def flops(self):
        """Floating-point operations of the forward product (2 per multiply-add; bias not counted)."""
        rows, inner = self.col_shape
        return 2 * rows * inner * self.w_shape[0]

    @property
    def label(self):
        return f"{_fmt(self.x_shape)} * {_fmt(self.w_shape)} pad {self.pad}"


@dataclass(frozen=True)
class PoolShape:
    name: str
    x_shape: tuple
    pool_h: int
    pool_w: int
    stride: int
    pad: int
    out_hw: tuple  # as the layer computes it

    @property
    def out_shape(self):
        return tuple(self.x_shape[:2]) + self.out_hw

    @property
    def label(self):
        return f"{_fmt(self.x_shape)} {self.pool_h}x{self.pool_w}/{self.stride}"


@dataclass(frozen=True)
class ReluShape:
    name: str
    x_shape: tuple

    @property
    def label(self):
        return _fmt(self.x_shape)


@dataclass(frozen=True)
class AffineShape:
    name: str
    x_shape: tuple
    w_shape: tuple

    @property
    def out_shape(self):
        return self.x_shape[0], self.w_shape[1]

    @property
    def flops(self):
        """Floating-point operations of the forward product (bias not counted)."""
        return 2 * self.x_shape[0] * self.w_shape[0] * self.w_shape[1]

    @property
    def label(self):
        return f"{_fmt(self.x_shape)} * {_fmt(self.w_shape)}"


@dataclass(frozen=True)
class NetworkShapes:
    conv: tuple
    pool: tuple
    relu: tuple  # one per distinct activation shape, named after the first layer that has it
    affine: tuple

    def find(self, name):
        for layer in self.conv + self.pool + self.relu + self.affine:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def forward_flops(self):
        """Forward flops of one batch: the products of every convolution and affine layer."""
        return sum(layer.flops for layer in self.conv + self.affine)


# --- input data -------------------------------------------------------------

def _rng(*key):
    """A generator seeded from a name, so every implementation gets the same data."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _normal(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def conv_arrays(shape, dtype):
    """(x, W, b, dout) for a convolution, in ``dtype``; W He-scaled as in the network."""
    rng = _rng("conv", shape.name)
    fan_in = np.prod(shape.w_shape[1:])
    x = _normal(rng, shape.x_shape, dtype)
    W = _normal(rng, shape.w_shape, dtype, np.sqrt(2.0 / fan_in))
    b = _normal(rng, shape.w_shape[:1], dtype, 0.1)
    dout = _normal(rng, shape.out_shape, dtype)
    return x, W, b, dout


def col_array(shape, dtype):
    return _normal(_rng("col", shape.name), shape.col_shape, dtype)


def pool_arrays(shape, dtype):
    rng = _rng("pool", shape.name)
    return _normal(rng, shape.x_shape, dtype), _normal(rng, shape.out_shape, dtype)


def relu_arrays(shape, dtype):
    rng = _rng("relu", shape.name)
    return _normal(rng, shape.x_shape, dtype), _normal(rng, shape.x_shape, dtype)


def affine_arrays(shape, dtype):
    rng = _rng("affine", shape.name)
    x = _normal(rng, shape.x_shape, dtype)
    W = _normal(rng, shape.w_shape, dtype, np.sqrt(2.0 / shape.w_shape[0]))
    b = np.zeros(shape.w_shape[1], dtype=dtype)
    dout = _normal(rng, shape.out_shape, dtype)
    return x, W, b, dout


def image_batch(n_images, dtype):
    """Images in [0, 1) like normalized MNIST, and integer labels."""
    rng = _rng("images", n_images)
    x = rng.random((n_images,) + INPUT_SHAPE).astype(dtype)
    t = rng.integers(0, 10, n_images)
    return x, t


_KINDS = {cls.__name__: cls for cls in (ConvShape, PoolShape, ReluShape, AffineShape)}


def to_dict(shape):
    """A JSON-ready description of a layer shape; ``from_dict`` rebuilds it."""
    return dict(dataclasses.asdict(shape), kind=type(shape).__name__)


def from_dict(data):
    data = dict(data)
    cls = _KINDS[data.pop("kind")]
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def network_to_dict(shapes):
    return {group: [to_dict(s) for s in getattr(shapes, group)] for group in ("conv", "pool", "relu", "affine")}


def network_from_dict(data):
    return NetworkShapes(**{group: tuple(from_dict(s) for s in items) for group, items in data.items()})
