"""asv benchmarks of every kernel at the chapter-8 network's layer shapes, per backend and dtype.

Backends that do not import in the commit being measured are skipped
(``setup`` raises NotImplementedError), so every commit reports what it has.
"""
import fastconv

from . import _network as net

BACKENDS = ["cython", "numba", "reference"]
DTYPES = ["float32", "float64"]
SHAPES = net.network_shapes()


def activate(backend):
    if backend not in fastconv.available_backends():
        raise NotImplementedError(f"backend {backend!r} is not available")
    fastconv.set_backend(backend)


class _KernelSuite:
    """Builds, in setup, the operations named by ``time_<kernel>`` for one layer shape."""

    param_names = ["backend", "dtype", "layer"]
    kernels = ()

    def setup(self, backend, dtype, layer):
        activate(backend)
        shape = SHAPES.find(layer)
        self.ops = {kernel: net.KERNEL_OPS[kernel](shape, dtype) for kernel in self.kernels}
        for op in self.ops.values():
            op()  # first call: JIT compilation and first-touch allocation stay out of the timings


class Convolution(_KernelSuite):
    params = [BACKENDS, DTYPES, [s.name for s in SHAPES.conv]]
    kernels = ("im2col", "col2im", "conv_forward", "conv_backward")

    def time_im2col(self, *params):
        self.ops["im2col"]()

    def time_col2im(self, *params):
        self.ops["col2im"]()

    def time_conv_forward(self, *params):
        self.ops["conv_forward"]()

    def time_conv_backward(self, *params):
        self.ops["conv_backward"]()


class MaxPooling(_KernelSuite):
    params = [BACKENDS, DTYPES, [s.name for s in SHAPES.pool]]
    kernels = ("maxpool_forward", "maxpool_backward")

    def time_maxpool_forward(self, *params):
        self.ops["maxpool_forward"]()

    def time_maxpool_backward(self, *params):
        self.ops["maxpool_backward"]()


class Relu(_KernelSuite):
    params = [BACKENDS, DTYPES, [s.name for s in SHAPES.relu]]
    kernels = ("relu_forward", "relu_backward")

    def time_relu_forward(self, *params):
        self.ops["relu_forward"]()

    def time_relu_backward(self, *params):
        self.ops["relu_backward"]()


class Affine(_KernelSuite):
    """Plain NumPy in every backend; timed per backend to show the noise between identical code."""

    params = [BACKENDS, DTYPES, [s.name for s in SHAPES.affine]]
    kernels = ("affine_forward", "affine_backward")

    def time_affine_forward(self, *params):
        self.ops["affine_forward"]()

    def time_affine_backward(self, *params):
        self.ops["affine_backward"]()
