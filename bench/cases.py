"""The benchmarks of the report: every kernel at every layer shape, then the network."""
import fnmatch
from dataclasses import dataclass
from typing import Callable, Optional

from bench import torch_ops
from bench.benchmarks import _network as net

# kernel name -> which layers of the network it runs on
KERNEL_LAYERS = {
    "im2col": "conv",
    "col2im": "conv",
    "conv_forward": "conv",
    "conv_backward": "conv",
    "maxpool_forward": "pool",
    "maxpool_backward": "pool",
    "relu_forward": "relu",
    "relu_backward": "relu",
    "affine_forward": "affine",
    "affine_backward": "affine",
}
# flops of a kernel call as a multiple of its layer's forward product
FLOP_FACTOR = {"conv_forward": 1, "conv_backward": 2, "affine_forward": 1, "affine_backward": 2}
NETWORK = "network"


@dataclass(frozen=True)
class Case:
    kernel: str
    layer: str
    label: str  # the shapes, in words
    dtype: str
    make: Callable  # impl -> (run, warmup or None)
    flops: Optional[float] = None  # per reported unit
    scale: float = 1.0  # reported time = seconds per call * scale
    unit: str = "call"
    fixed_number: Optional[int] = None  # calls per sample; None: chosen by calibration
    min_repeat: Optional[int] = None  # fewer samples than the settings' minimum suffice when slow

    @property
    def id(self):
        return f"{self.kernel}/{self.layer}"


def _kernel_maker(kernel, shape, dtype):
    def make(impl):
        ops = torch_ops.KERNEL_OPS if not impl.is_backend else net.KERNEL_OPS
        return ops[kernel](shape, dtype), None
    return make


def _train_maker(dtype):
    def make(impl):
        return (torch_ops if not impl.is_backend else net).train_step_op(dtype), None
    return make


def _inference_maker(dtype, n_images):
    def make(impl):
        return (torch_ops if not impl.is_backend else net).inference_ops(dtype, n_images)
    return make


def build_cases(dtypes, n_images=net.INFERENCE_IMAGES, only=None):
    """Every benchmark for every dtype; ``only``: fnmatch patterns on ``kernel/layer`` ids."""
    if n_images < net.BATCH or n_images % net.BATCH:
        raise ValueError(f"the number of inference images must be a positive multiple of {net.BATCH}, got {n_images}")
    shapes = net.network_shapes()
    layers = {"conv": shapes.conv, "pool": shapes.pool, "relu": shapes.relu, "affine": shapes.affine}
    batch_label = f"batch {net.BATCH}, input {'x'.join(map(str, net.INPUT_SHAPE))}"
    cases = []
    for dtype in dtypes:
        for kernel, kind in KERNEL_LAYERS.items():
            for shape in layers[kind]:
                flops = FLOP_FACTOR[kernel] * shape.flops if kernel in FLOP_FACTOR else None
                cases.append(Case(kernel, shape.name, shape.label, dtype, _kernel_maker(kernel, shape, dtype), flops))
        cases.append(Case("train_step", NETWORK, f"gradient + Adam, {batch_label}", dtype, _train_maker(dtype),
                          flops=3 * shapes.forward_flops))
        full = net.INFERENCE_IMAGES
        cases.append(Case(
            "inference", NETWORK,
            f"predict {full} images" + (f" (timed on {n_images}, scaled)" if n_images != full else "")
            + f", batches of {net.BATCH}",
            dtype, _inference_maker(dtype, n_images), flops=shapes.forward_flops * full / net.BATCH,
            scale=full / n_images, unit=f"{full} images", fixed_number=1,
            min_repeat=2,  # a sample is 100 forward passes already; the reference's takes half a minute
        ))
    if only:
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c.id, pattern) for pattern in only)]
    return cases
