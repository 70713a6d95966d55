"""The benchmarks of the report, as plain data: every kernel at every layer shape, then the network.

A case says what to run, never how: each process that measures it builds the
operation itself (``bench.worker``), so a case travels between processes as a
dict (``to_dict``/``from_dict``).
"""
import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Optional

from bench.benchmarks import _shapes

# kernel name -> which layers of the network it runs on
KERNEL_LAYERS = {
    "conv_forward": "conv",
    "conv_backward": "conv",
    "im2col": "conv",
    "col2im": "conv",
    "maxpool_forward": "pool",
    "maxpool_backward": "pool",
    "relu_forward": "relu",
    "relu_backward": "relu",
    "affine_forward": "affine",
    "affine_backward": "affine",
}
CONV_KERNELS = ("conv_forward", "conv_backward")
# flops of a kernel call as a multiple of its layer's forward product
FLOP_FACTOR = {"conv_forward": 1, "conv_backward": 2, "affine_forward": 1, "affine_backward": 2}
NETWORK = "network"
TRAIN_STEP = "train_step"
INFERENCE = "inference"


@dataclass(frozen=True)
class Case:
    kernel: str
    layer: str
    label: str  # the shapes, in words
    dtype: str
    shape: Optional[dict] = None  # the layer shape (``_shapes.to_dict``); None for the network
    images: int = 0  # inference: images timed per call
    flops: Optional[float] = None  # per reported unit
    scale: float = 1.0  # reported time = seconds per call * scale
    unit: str = "call"
    fixed_number: Optional[int] = None  # calls per sample; None: chosen by calibration
    min_repeat: Optional[int] = None  # fewer samples than the settings' minimum suffice when slow
    repeat: Optional[int] = None  # more samples than the settings' (the network's headline figures)
    max_time: Optional[float] = None  # seconds of samples after which min_repeat suffice, instead of the settings'
    settle_time: Optional[float] = None  # untimed seconds before each sample, instead of the settings'

    @property
    def id(self):
        return f"{self.kernel}/{self.layer}"

    def layer_shape(self):
        return None if self.shape is None else _shapes.from_dict(self.shape)

    def to_dict(self):
        return dataclasses.asdict(self)


def from_dict(data):
    return Case(**data)


def build_cases(shapes, dtypes, n_images=_shapes.INFERENCE_IMAGES, only=None, kernels="all",
                network_repeat=None, inference_dtypes=("float32",), network_settle_time=None):
    """The benchmarks: the network first (train step per dtype, inference in ``inference_dtypes``),
    then the kernels at every layer (``kernels``: "all", "conv" for the forward and backward
    convolutions only, or "none").

    ``shapes``: the network's ``NetworkShapes``; ``only``: fnmatch patterns on ``kernel/layer`` ids.
    ``network_settle_time``: the untimed seconds before each sample of the network's benchmarks.
    """
    batch = _shapes.BATCH
    if n_images < batch or n_images % batch:
        raise ValueError(f"the number of inference images must be a positive multiple of {batch}, got {n_images}")
    layers = {"conv": shapes.conv, "pool": shapes.pool, "relu": shapes.relu, "affine": shapes.affine}
    batch_label = f"batch {batch}, input {'x'.join(map(str, _shapes.INPUT_SHAPE))}"
    full = _shapes.INFERENCE_IMAGES
    cases = []
    for dtype in dtypes:
        # the headline figures: network_repeat samples of every implementation, unless one takes seconds
        cases.append(Case(TRAIN_STEP, NETWORK, f"gradient + Adam, {batch_label}", dtype,
                          flops=3 * shapes.forward_flops, repeat=network_repeat, max_time=5.0,
                          settle_time=network_settle_time))
        if dtype in inference_dtypes:
            cases.append(Case(
                INFERENCE, NETWORK,
                f"predict {full} images" + (f" (timed on {n_images}, scaled)" if n_images != full else "")
                + f", batches of {batch}",
                dtype, images=n_images, flops=shapes.forward_flops * full / batch, scale=full / n_images,
                unit=f"{full} images", fixed_number=1,
                # a sample is 100 forward passes already: the fast ones take five, the reference (many
                # seconds each) three
                min_repeat=3, max_time=8.0, settle_time=network_settle_time,
            ))
    for dtype in dtypes:
        for kernel, kind in KERNEL_LAYERS.items():
            if kernels == "none" or (kernels == "conv" and kernel not in CONV_KERNELS):
                continue
            for shape in layers[kind]:
                flops = FLOP_FACTOR[kernel] * shape.flops if kernel in FLOP_FACTOR else None
                cases.append(Case(kernel, shape.name, shape.label, dtype, shape=_shapes.to_dict(shape), flops=flops))
    if only:
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c.id, pattern) for pattern in only)]
    return cases
