"""``python -m fastconv info``: versions, backends and threading on this machine."""
import platform
import sys
from importlib import metadata

import numpy as np

import fastconv
from fastconv import _build_check, _registry, _threads


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cython():
    try:
        from fastconv._ext import _buildinfo
    except ImportError:
        return "unknown (compiled extensions failed to import)"
    return _buildinfo.cython_version()


def _pool():
    try:
        from fastconv._ext import _parallel
    except ImportError as exc:
        return f"unknown (compiled extensions failed to import: {exc})"
    return "threads (POSIX)" if _parallel.threaded() else "serial build (one thread)"


def _simd():
    try:
        from fastconv.backends import cython
    except ImportError as exc:
        return f"unknown (the cython backend does not import: {exc})"
    return f"{cython.simd_variant()} for direct convolutions (this CPU runs: {', '.join(cython.available_variants())})"


def _blas():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    pools = [f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
             for p in threadpool_info() if p.get("user_api") == "blas"]
    return ", ".join(pools) or "none found"


def collect():
    """The facts ``info`` prints, as a dict (also used by the benchmarks)."""
    status = _registry.backend_status()
    return {
        "fastconv": fastconv.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "cython": _cython(),
        "numba": _version("numba"),
        "pool": _pool(),
        "simd": _simd(),
        "blas": _blas(),
        "cpus": _threads.cpu_count(),
        "num_threads": _threads.get_num_threads(),
        "backends": status,
        "active_backend": _registry.get_backend(),
        "build_problem": _build_check.diagnosis(),
    }


def format_info(facts):
    lines = [
        f"fastconv {facts['fastconv']}",
        f"python   {facts['python']} on {facts['platform']}",
        f"numpy    {facts['numpy']}",
        f"cython   {facts['cython']} (compiled with)",
        f"numba    {facts['numba']}",
        f"pool     {facts['pool']}",
        f"simd     {facts['simd']}",
        f"blas     {facts['blas']}",
        f"threads  {facts['num_threads']} (CPUs available: {facts['cpus']}; set FASTCONV_NUM_THREADS to change)",
        "backends:",
    ]
    for name, state in facts["backends"].items():
        mark = "*" if name == facts["active_backend"] else " "
        lines.append(f"  {mark} {name:<10} {'available' if state == 'ok' else 'UNAVAILABLE: ' + state}")
    lines.append(f"active backend: {facts['active_backend']} (set FASTCONV_BACKEND or fastconv.set_backend to change)")
    if facts.get("build_problem"):
        lines = ["WARNING: " + facts["build_problem"].replace("\n", "\n         "), ""] + lines
    return "\n".join(lines)


def main():
    print(format_info(collect()))
    return 0
