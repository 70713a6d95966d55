"""Time the numba backend against the reference on the chapter-8 network (batch 100).

Prints median milliseconds of a train step (gradient + Adam update) for each
dtype, then of every kernel summed over the network's layers. Backends are
timed in interleaved rounds, so that load from other processes hits them
alike; the first (compiling) call of each is excluded. ``--compile`` instead
times the first train step of fresh processes with an empty, then a filled,
kernel cache; ``--threading`` times the train step with the default threads
against serial kernels with a multi-threaded BLAS, and against one thread.

    python scripts/bench_numba.py [--rounds 7] [--backends numba,reference]
    python scripts/bench_numba.py --compile
    python scripts/bench_numba.py --threading
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import fastconv
from fastconv import kernels
from fastconv.models import DeepConvNet
from fastconv.optimizer import Adam

BATCH = 100


def train_step_case(dtype):
    np.random.seed(0)
    net = DeepConvNet(dtype=dtype)
    optimizer = Adam(lr=0.001)
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 1, 28, 28)).astype(dtype)
    t = rng.integers(0, 10, BATCH)

    def step():
        optimizer.update(net.params, net.gradient(x, t))
    return step


def layer_inputs(dtype):
    """Inputs of every conv, pool and relu of the network, recorded from one reference pass."""
    np.random.seed(0)
    net = DeepConvNet(dtype=dtype)
    x = np.random.default_rng(0).random((BATCH, 1, 28, 28)).astype(dtype)
    records = []
    with fastconv.use_backend("reference"):
        for layer in net.layers:
            name = type(layer).__name__
            if name in ("Convolution", "Pooling", "Relu") and x.ndim == 4:
                records.append((name, layer, x))
            x = layer.forward(x, False) if name == "Dropout" else layer.forward(x)
    return records


def kernel_cases(dtype):
    """kernel name -> a callable running that kernel on every matching layer of the network."""
    records = layer_inputs(dtype)
    convs = [(layer, x) for name, layer, x in records if name == "Convolution"]
    pools = [(layer, x) for name, layer, x in records if name == "Pooling"]
    relus = [x for name, _, x in records if name == "Relu"]
    rng = np.random.default_rng(1)

    def conv_state():
        states = []
        for layer, x in convs:
            out, cache = kernels.conv_forward(x, layer.W, layer.b, layer.stride, layer.pad)
            states.append((layer, x, cache, rng.standard_normal(out.shape).astype(dtype)))
        return states

    def pool_state():
        states = []
        for layer, x in pools:
            out, cache = kernels.maxpool_forward(x, layer.pool_h, layer.pool_w, layer.stride, layer.pad)
            states.append((layer, x, cache, rng.standard_normal(out.shape).astype(dtype)))
        return states

    def per_backend(make):
        built = {}

        def run():
            key = fastconv.get_backend()
            if key not in built:
                built[key] = make()
            built[key]()
        return run

    def im2col():
        cols = [(layer, x) for layer, x in convs]
        return lambda: [kernels.im2col(x, 3, 3, layer.stride, layer.pad) for layer, x in cols]

    def col2im():
        cols = [(kernels.im2col(x, 3, 3, layer.stride, layer.pad), x.shape, layer) for layer, x in convs]
        return lambda: [kernels.col2im(c, shape, 3, 3, layer.stride, layer.pad) for c, shape, layer in cols]

    def conv_forward():
        states = conv_state()
        return lambda: [kernels.conv_forward(x, layer.W, layer.b, layer.stride, layer.pad, cache)
                        for layer, x, cache, _ in states]

    def conv_backward():
        states = conv_state()
        return lambda: [kernels.conv_backward(d, cache, layer.W) for layer, _, cache, d in states]

    def maxpool_forward():
        states = pool_state()
        return lambda: [kernels.maxpool_forward(x, layer.pool_h, layer.pool_w, layer.stride, layer.pad, cache)
                        for layer, x, cache, _ in states]

    def maxpool_backward():
        states = pool_state()
        return lambda: [kernels.maxpool_backward(d, cache) for _, _, cache, d in states]

    def relu_forward():
        return lambda: [kernels.relu_forward(x) for x in relus]

    def relu_backward():
        pairs = [(kernels.relu_forward(x)[1], rng.standard_normal(x.shape).astype(dtype)) for x in relus]
        return lambda: [kernels.relu_backward(d, m) for m, d in pairs]

    makers = [im2col, col2im, conv_forward, conv_backward, maxpool_forward, maxpool_backward,
              relu_forward, relu_backward]
    return {make.__name__: per_backend(make) for make in makers}


def interleaved_medians(run, backends, rounds):
    """Median seconds of ``run`` per backend, rotating the order every round."""
    samples = {name: [] for name in backends}
    for name in backends:  # first calls: compilation, allocation
        with fastconv.use_backend(name):
            run()
    for r in range(rounds):
        order = backends[r % len(backends):] + backends[:r % len(backends)]
        for name in order:
            with fastconv.use_backend(name):
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


FIRST_STEP = """
import time
start = time.perf_counter()
import numpy as np
import fastconv
from fastconv.models import DeepConvNet
imported = time.perf_counter()
fastconv.set_backend("numba")
loaded = time.perf_counter()
dtype = np.dtype("{dtype}")
np.random.seed(0)
net = DeepConvNet(dtype=dtype)
x = np.random.rand(100, 1, 28, 28).astype(dtype)
t = np.random.randint(0, 10, 100)
before = time.perf_counter()
net.gradient(x, t)
first = time.perf_counter()
net.gradient(x, t)
second = time.perf_counter()
print(imported - start, loaded - imported, first - before, second - first)
"""


def compile_times(dtypes):
    """Seconds of the first train step in new processes: cold cache, then warm."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for state in ("cold", "warm"):
            for dtype in dtypes:
                out = subprocess.run([sys.executable, "-c", FIRST_STEP.format(dtype=dtype)], env=env,
                                     capture_output=True, text=True, check=True).stdout
                imported, loaded, first, second = map(float, out.split())
                print(f"{state} cache, {dtype}: import fastconv {imported:.2f} s, load backend {loaded:.2f} s, "
                      f"first train step {first:.2f} s (the next one {second:.3f} s)")


def threading_choices(dtypes, rounds):
    """Train step of the default threading against the two simple alternatives, interleaved."""
    import contextlib

    from fastconv.backends import numba as backend
    fastconv.set_backend("numba")
    limiter = backend._single_threaded_blas
    threads = str(fastconv.get_num_threads())
    settings = {
        f"{threads} threads, BLAS 1 thread each (default)": (threads, limiter),
        "serial kernels, multi-threaded BLAS": ("1", contextlib.nullcontext()),
        "1 thread, BLAS 1 thread": ("1", limiter),
    }
    for dtype in dtypes:
        steps = {name: train_step_case(np.dtype(dtype)) for name in settings}
        samples = {name: [] for name in settings}
        for r in range(rounds + 1):
            for name, (count, blas) in settings.items():
                os.environ["FASTCONV_NUM_THREADS"] = count
                backend._single_threaded_blas = blas
                start = time.perf_counter()
                steps[name]()
                if r:  # the first round compiles and allocates
                    samples[name].append(time.perf_counter() - start)
        backend._single_threaded_blas = limiter
        os.environ["FASTCONV_NUM_THREADS"] = threads
        for name, values in samples.items():
            print(f"{dtype} train step, {name}: median {statistics.median(values) * 1e3:.1f} ms, "
                  f"best {min(values) * 1e3:.1f} ms")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backends", default="numba,reference")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--no-kernels", action="store_true", help="time the train step only")
    parser.add_argument("--compile", action="store_true", help="time compilation: cold and warm kernel cache")
    parser.add_argument("--threading", action="store_true", help="compare the threading arrangements")
    args = parser.parse_args(argv)
    if args.compile:
        compile_times(args.dtypes.split(","))
        return
    if args.threading:
        threading_choices(args.dtypes.split(","), args.rounds)
        return
    backends = args.backends.split(",")
    print(f"threads: {fastconv.get_num_threads()}, rounds: {args.rounds}, medians in ms")
    for dtype in args.dtypes.split(","):
        dtype = np.dtype(dtype)
        steps = {}

        def run_step():
            key = fastconv.get_backend()
            if key not in steps:
                steps[key] = train_step_case(dtype)
            steps[key]()
        medians = interleaved_medians(run_step, backends, args.rounds)
        print(f"\n{dtype.name} train step: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in medians.items())
              + (f"  (x{medians[backends[-1]] / medians[backends[0]]:.1f})" if len(backends) > 1 else ""))
        if args.no_kernels:
            continue
        for kernel, run in kernel_cases(dtype).items():
            medians = interleaved_medians(run, backends, args.rounds)
            ratio = f"  x{medians[backends[-1]] / medians[backends[0]]:.1f}" if len(backends) > 1 else ""
            print(f"  {kernel:<17}" + "".join(f"{k} {v * 1e3:8.2f}  " for k, v in medians.items()) + ratio)


if __name__ == "__main__":
    main()
