"""Benchmarks of fastconv at the shapes of the book's chapter-8 network.

``python -m bench`` times a training step, inference and every kernel at
every layer for every available backend, the cython backend's im2col + GEMM
convolutions, and PyTorch, each implementation in a worker process of its own
(``bench.worker``), taking samples in turns, and writes a markdown report and
a JSON file of raw samples, with the machine's FMA peak measured in the same
run (``bench.peak``). ``python -m bench compare OLD.json NEW.json`` fails
when a benchmark got slower. ``bench/benchmarks`` holds the same operations
as airspeed velocity (asv) benchmarks for regression runs across commits.
"""
