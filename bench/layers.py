"""``python -m bench.layers``: the train step of the book's own network class against ``DeepConvNet``'s.

The book's ``DeepConvNet`` with ``from fastconv.layers import *`` calls every
layer's forward and backward one by one; ``fastconv.models.DeepConvNet`` runs
each convolution and its ReLU as one (``conv_relu_forward``). Both start from
the same weights and take the same steps (Adam, batch 100), alternately, in
one process on the active backend (``FASTCONV_BACKEND``), so that their
medians and ratio are measured side by side.
"""
import argparse
import statistics
import sys
import time

import numpy as np

import fastconv
from fastconv.layers import Dropout
from fastconv.models import DeepConvNet
from fastconv.optimizer import Adam


def layer_by_layer_gradient(net, x, t):
    """The book's ``DeepConvNet.gradient``: each layer's forward, the loss, each layer's backward."""
    y = x
    for layer in net.layers:
        y = layer.forward(y, True) if isinstance(layer, Dropout) else layer.forward(y)
    net.last_layer.forward(y, t)
    dout = net.last_layer.backward(1)
    for layer in reversed(net.layers):
        dout = layer.backward(dout)
    return {f"{name}{i + 1}": getattr(net.layers[index], "d" + name)
            for i, index in enumerate(net._PARAM_LAYERS) for name in ("W", "b")}


def measure(dtype, steps, warmup=3):
    """(median seconds of the layer-by-layer step, of DeepConvNet's step), alternating step by step."""
    np.random.seed(0)
    x = np.random.rand(100, 1, 28, 28).astype(dtype)
    t = np.random.randint(0, 10, 100)
    nets = [DeepConvNet(dtype=dtype) for _ in range(2)]
    nets[1].set_params(nets[0].params)
    runs = [(nets[0], Adam(), lambda net: layer_by_layer_gradient(net, x, t)),
            (nets[1], Adam(), lambda net: net.gradient(x, t))]
    times = [[], []]
    for step in range(warmup + steps):
        for i, (net, optimizer, gradient) in enumerate(runs):
            start = time.perf_counter()
            optimizer.update(net.params, gradient(net))
            if step >= warmup:
                times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.layers", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--steps", type=int, default=50, help="timed steps of each (default 50)")
    args = parser.parse_args(argv)
    layers, model = measure(np.dtype(args.dtype), args.steps)
    print(f"backend {fastconv.get_backend()}, {args.dtype}, threads {fastconv.get_num_threads()}, "
          f"medians of {args.steps} steps each, alternating")
    print(f"layer by layer (the book's network class): {layers * 1e3:.1f} ms")
    print(f"DeepConvNet (convolution and ReLU fused):   {model * 1e3:.1f} ms")
    print(f"layer by layer / DeepConvNet: {layers / model:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
