"""What the numbers were measured on: CPU, BLAS, OpenMP, versions, GEMM peak."""
import os
import platform
import time
import warnings
from importlib import metadata

import numpy as np

import fastconv
from fastconv._threads import cpu_count

THREAD_ENV_VARS = ("FASTCONV_NUM_THREADS", "FASTCONV_BACKEND", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _cpuinfo():
    """(model name, physical cores) from /proc/cpuinfo; (None, None) where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None, None
    model, cores = None, set()
    physical_id = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model is None:
            model = value
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return model, (len(cores) or None)


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _thread_pools():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    keep = ("user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer", "architecture")
    return [{k: pool.get(k) for k in keep if k in pool} for pool in threadpool_info()]


def collect(torch=None):
    """Facts about this machine and the software measured, as a JSON-ready dict."""
    model, physical = _cpuinfo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing backend is reported in the facts, not as a warning
        from fastconv import info
        facts = info.collect()
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical,
        "cpus_available": cpu_count(),
        "fastconv_threads": fastconv.get_num_threads(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "thread_pools": _thread_pools(),
        "blas": facts["blas"],
        "openmp": facts["openmp"],
        "backends": facts["backends"],
        "platform": platform.platform(),
        "environment": {name: os.environ[name] for name in THREAD_ENV_VARS if name in os.environ},
    }


def versions(torch=None):
    return {
        "python": platform.python_version(),
        "fastconv": fastconv.__version__,
        "numpy": np.__version__,
        "cython": _version("Cython"),
        "numba": _version("numba"),
        "threadpoolctl": _version("threadpoolctl"),
        "torch": torch.__version__ if torch is not None else None,
    }


def gemm_peak(dtype, n=2048, repeat=5):
    """Best GFLOP/s of ``np.matmul`` on n x n matrices: the yardstick for conv and affine rates."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype=dtype)
    np.matmul(a, b, out=out)  # warm-up: BLAS threads, first touch of out
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        samples.append(time.perf_counter() - start)
    flops = 2.0 * n ** 3
    return {"n": n, "flops": flops, "samples_s": samples, "gflops": flops / min(samples) / 1e9}
