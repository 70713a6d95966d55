"""fastconv: fast, drop-in convolution layers for Deep Learning from Scratch style NumPy code.

Change ``from common.layers import *`` to ``from fastconv.layers import *``.
Kernels run on a backend chosen by ``set_backend``, ``use_backend`` or the
environment variable ``FASTCONV_BACKEND``; ``python -m fastconv info`` tells
which backends work on this machine.
"""
from fastconv._registry import (
    available_backends,
    backend_status,
    get_backend,
    known_backends,
    register_backend,
    set_backend,
    use_backend,
)
from fastconv._threads import get_num_threads

__version__ = "0.1.0"

__all__ = [
    "available_backends", "backend_status", "get_backend", "known_backends",
    "register_backend", "set_backend", "use_backend", "get_num_threads", "__version__",
]
