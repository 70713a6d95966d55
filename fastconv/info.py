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


NOT_BUILT = "none: the compiled extensions are not built"


def _cython():
    if _build_check.skipped_reason() is not None:
        return NOT_BUILT
    try:
        from fastconv._ext import _buildinfo
    except ImportError:
        return "unknown (compiled extensions failed to import)"
    return _buildinfo.cython_version()


def _pool():
    if _build_check.skipped_reason() is not None:
        return NOT_BUILT
    try:
        from fastconv._ext import _parallel
    except ImportError as exc:
        return f"unknown (compiled extensions failed to import: {exc})"
    if not _parallel.threaded():
        return "serial build (one thread)"
    return "threads (Win32)" if sys.platform == "win32" else "threads (POSIX)"


def _simd():
    if _build_check.skipped_reason() is not None:
        return NOT_BUILT
    try:
        from fastconv.backends import cython
    except ImportError as exc:
        return f"unknown (the cython backend does not import: {exc})"
    variants = cython.available_variants()
    if not variants:
        return "none: the direct convolution kernels are not built (im2col only)"
    return f"{cython.simd_variant()} for direct convolutions (this CPU runs: {', '.join(variants)})"


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
    default, why = _registry.default_backend()
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
        "default_backend": default,
        "default_reason": why,
        "not_built": _build_check.skipped_reason(),
        "build_problem": _build_check.diagnosis(),
    }


def format_info(facts):
    lines = [
        f"fastconv {facts['fastconv']}",
        f"python   {facts['python']} on {facts['platform']}",
        f"numpy    {facts['numpy']}",
        f"cython   {facts['cython']}" + (" (compiled with)" if facts["cython"][:1].isdigit() else ""),
        f"numba    {facts['numba']}",
        f"pool     {facts['pool']}",
        f"simd     {facts['simd']}",
        f"blas     {facts['blas']}",
        f"threads  {facts['num_threads']} (CPUs available: {facts['cpus']}; set FASTCONV_NUM_THREADS to change)",
        "backends:",
    ]
    not_built = facts.get("not_built")
    for name, state in facts["backends"].items():
        mark = "*" if name == facts["active_backend"] else " "
        if state == "ok":
            state = "available"
        elif name == "cython" and not_built is not None:
            state = f"NOT BUILT: {not_built} (install a C compiler and reinstall fastconv to build it)"
        else:
            state = "UNAVAILABLE: " + state
        lines.append(f"  {mark} {name:<10} {state}")
    if facts.get("default_backend"):
        lines.append(f"default: {facts['default_backend']} ({facts['default_reason']})")
    lines.append(f"active backend: {facts['active_backend']} (set FASTCONV_BACKEND or fastconv.set_backend to change)")
    if facts.get("build_problem") and not_built is None:
        lines = ["WARNING: " + facts["build_problem"].replace("\n", "\n         "), ""] + lines
    return "\n".join(lines)


def main():
    print(format_info(collect()))
    return 0
