"""Forced variants of a backend, measured beside the backend's own choice.

``cython-im2col`` is the cython backend with its convolutions forced onto the
im2col + GEMM path (the path before direct convolution, kept as the fallback
for shapes the direct kernels do not cover), so that every convolution kernel
is compared with it side by side in one run. Each variant runs in a worker
process of its own (``bench.worker``); ``force`` is called there once, right
after the backend is chosen.
"""
import contextlib

# implementation name -> (backend, variant)
VARIANTS = {"cython-im2col": ("cython", "im2col")}
# the benchmarks a variant takes part in: the convolutions it changes, and the train step they sum to
VARIANT_KERNELS = ("conv_forward", "conv_backward", "train_step")


_held = contextlib.ExitStack()  # forcings stay in effect for the life of the worker process


def _cython_im2col():
    """Force the cython backend's im2col + GEMM convolutions for this process; None, or why not."""
    from fastconv.backends import cython
    engine = getattr(cython, "conv_engine", None)
    if engine is None:
        return "this cython backend has no conv_engine switch: its only path is im2col + GEMM"
    _held.enter_context(engine("im2col"))
    return None


_FORCE = {("cython", "im2col"): _cython_im2col}


def force(backend, variant):
    """Make this process's ``backend`` use ``variant``; returns None, or why it cannot."""
    forcing = _FORCE.get((backend, variant))
    if forcing is None:
        return f"unknown variant {variant!r} of backend {backend!r}"
    return forcing()
