"""Kernel backends: one module each, implementing the interface in ``fastconv.kernels``."""
