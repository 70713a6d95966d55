"""Which threading layout suits the cython backend: the chapter-8 train step under each.

Layouts, timed round by round in one process (medians of per-round medians):

- ``openmp``: the default. Kernels in OpenMP regions of ``get_num_threads()``
  threads, the GEMMs inside them on a BLAS held to one thread.
- ``openmp, numpy blas 1``: the same, with NumPy's BLAS (the Affine layers)
  limited to one thread for the whole step.
- ``serial``: ``FASTCONV_NUM_THREADS=1``.
- ``threaded blas``: kernels on one thread, their GEMMs on the BLAS with its
  own threads (the two-pool layout the default avoids).

    python scripts/bench_cython_threads.py --dtype float32 --steps 5 --rounds 4
"""
import argparse
import contextlib
import os
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

import fastconv
from fastconv.backends import cython as backend
from fastconv.models import DeepConvNet
from fastconv.optimizer import Adam

LAYOUTS = ["openmp", "openmp, numpy blas 1", "serial", "threaded blas"]


@contextlib.contextmanager
def layout(name):
    threads, limiter = backend._threads, backend._single_threaded_blas
    saved_env = os.environ.get("FASTCONV_NUM_THREADS")
    limits = None
    if name == "openmp, numpy blas 1":
        limits = threadpool_limits(1, user_api="blas")
    elif name == "serial":
        os.environ["FASTCONV_NUM_THREADS"] = "1"
    elif name == "threaded blas":
        backend._threads = lambda work, least_per_thread=1: 1
        backend._single_threaded_blas = contextlib.nullcontext()
    try:
        yield
    finally:
        backend._threads, backend._single_threaded_blas = threads, limiter
        if saved_env is None:
            os.environ.pop("FASTCONV_NUM_THREADS", None)
        else:
            os.environ["FASTCONV_NUM_THREADS"] = saved_env
        if limits is not None:
            limits.restore_original_limits()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--steps", type=int, default=5, help="train steps per layout and round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.random((100, 1, 28, 28)).astype(args.dtype)
    t = rng.integers(0, 10, 100)
    np.random.seed(0)
    network = DeepConvNet(dtype=args.dtype)
    optimizer = Adam(lr=0.001)

    def step():
        optimizer.update(network.params, network.gradient(x, t))

    medians = {name: [] for name in LAYOUTS}
    with fastconv.use_backend("cython"):
        for _ in range(args.rounds):
            for name in LAYOUTS:
                with layout(name):
                    step()  # settle buffers and thread pools
                    times = []
                    for _ in range(args.steps):
                        start = time.perf_counter()
                        step()
                        times.append(time.perf_counter() - start)
                medians[name].append(1e3 * statistics.median(times))
    print(f"train step, batch 100, {args.dtype}, {fastconv.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, values in medians.items():
        print(f"  {name:<22} {statistics.median(values):7.1f} ms   rounds: "
              + " ".join(f"{v:.0f}" for v in values))


if __name__ == "__main__":
    main()
