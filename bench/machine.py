"""What the numbers were measured on: CPU, thread settings, versions, BLAS and its GEMM rate.

``cpu_facts`` runs in the report's own process; ``fastconv_facts``,
``torch_facts`` and ``gemm_peak`` run in the worker processes that measure
(``bench.worker``), so that the report's process imports neither fastconv nor
PyTorch.
"""
import os
import platform
import time
import warnings
from importlib import metadata

import numpy as np

# variables that change how the measured libraries run their threads; recorded as they were
THREAD_ENV_VARS = ("FASTCONV_NUM_THREADS", "FASTCONV_BACKEND", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                   "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")


def _cpuinfo():
    """(model name, physical cores, flags) from /proc/cpuinfo; Nones where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None, None, None
    model, flags, cores = None, None, set()
    physical_id = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model is None:
            model = value
        elif key == "flags" and flags is None:
            flags = set(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return model, (len(cores) or None), flags


def cpu_count():
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_facts(env=None):
    """Facts about this machine and the thread variables in ``env`` (default: this process's)."""
    env = os.environ if env is None else env
    model, physical, flags = _cpuinfo()
    simd = [f for f in ("avx512f", "avx2", "fma", "avx", "sse4_2", "neon", "asimd") if flags and f in flags]
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical,
        "cpus_available": cpu_count(),
        "simd": simd,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "environment": {name: env[name] for name in THREAD_ENV_VARS if name in env},
    }


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


def fastconv_facts(with_shapes=False):
    """fastconv's own description (``fastconv.info.collect``), versions and thread pools.

    With ``with_shapes`` the chapter-8 network's layer shapes too (this loads every backend).
    """
    import fastconv
    facts = {"fastconv_threads": fastconv.get_num_threads(), "backend": fastconv.get_backend(),
             "fastconv_file": fastconv.__file__}
    if with_shapes:
        from bench.benchmarks import _network, _shapes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a missing backend is reported in the facts, not as a warning
            from fastconv import info
            facts["info"] = info.collect()
            facts["available"] = fastconv.available_backends()
        facts["shapes"] = _shapes.network_to_dict(_network.network_shapes())
    facts["thread_pools"] = _thread_pools()
    facts["versions"] = {"fastconv": fastconv.__version__, "numpy": np.__version__,
                         "cython": _version("Cython"), "numba": _version("numba"),
                         "threadpoolctl": _version("threadpoolctl")}
    return facts


def torch_facts():
    import torch
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "torch_parallel_info": torch.__config__.parallel_info().strip().splitlines()}


def gemm_peak(dtype, n=2048, repeat=5):
    """Best GFLOP/s of ``np.matmul`` on n x n matrices: what NumPy's BLAS reaches on this machine."""
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
