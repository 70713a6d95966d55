"""Benchmarks of fastconv at the shapes of the book's chapter-8 network.

``python -m bench`` times every kernel of the interface, the Affine layer, a
whole training step and inference for every available backend (and PyTorch
when it imports), interleaved in one process, and writes a markdown table and
a JSON file of raw samples. ``python -m bench compare OLD.json NEW.json``
fails when a benchmark got slower. ``bench/benchmarks`` holds the same
operations as airspeed velocity (asv) benchmarks for regression runs across
commits.
"""
