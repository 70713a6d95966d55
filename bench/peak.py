"""The machine's peak rate of fused multiply-adds, measured with a micro-kernel built on the spot.

A small C function (below) runs independent chains of vector FMAs that stay
in registers: enough chains to cover the FMA latency on every pipe, nothing
loaded or stored in the loop. It is compiled with the system's C compiler for
the CPU it runs on (``-march=native``: the widest vectors the CPU has) and
called through ctypes, which releases the GIL, so that k Python threads run k
copies at once. The best of a few calls counts. Where no compiler works the
peak is reported as not measured, with the reason.
"""
import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

# 12 accumulators: FMA latency (4-5 cycles) x 2 pipes needs 8-10 in flight; 12 + 2 operands fit in
# the 16 registers of AVX2 as in the 32 of AVX-512
SOURCE = r"""
#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#elif defined(__AVX__)
#define VECTOR_BYTES 32
#else
#define VECTOR_BYTES 16
#endif

#define CHAINS 12
#define STEP(T) \
    a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c; \
    a4 = a4 * m + c; a5 = a5 * m + c; a6 = a6 * m + c; a7 = a7 * m + c; \
    a8 = a8 * m + c; a9 = a9 * m + c; a10 = a10 * m + c; a11 = a11 * m + c;

#define KERNEL(NAME, T, V)                                                         \
typedef T V __attribute__((vector_size(VECTOR_BYTES)));                            \
double NAME(long iterations, T start, T factor, T addend) {                       \
    V m = (V){0} + factor, c = (V){0} + addend;                                   \
    V a0 = (V){0} + start, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4,     \
      a5 = a0 + 5, a6 = a0 + 6, a7 = a0 + 7, a8 = a0 + 8, a9 = a0 + 9,             \
      a10 = a0 + 10, a11 = a0 + 11;                                               \
    for (long i = 0; i < iterations; i++) { STEP(T) }                              \
    V s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;             \
    double total = 0;                                                             \
    for (unsigned k = 0; k < sizeof(V) / sizeof(T); k++) total += s[k];            \
    return total;                                                                 \
}

KERNEL(fma_float32, float, vfloat)
KERNEL(fma_float64, double, vdouble)

int vector_bytes(void) { return VECTOR_BYTES; }
int chains(void) { return CHAINS; }
"""
ITEM_BYTES = {"float32": 4, "float64": 8}
FLAG_SETS = (["-O2", "-march=native", "-ffp-contract=fast"], ["-O2", "-ffp-contract=fast"])


def _compiler():
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(directory):
    """Compile the kernel in ``directory``; returns (ctypes library, flags used) or raises RuntimeError."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    src = Path(directory) / "fma_peak.c"
    src.write_text(SOURCE)
    errors = []
    for flags in FLAG_SETS:
        lib = Path(directory) / f"fma_peak{len(errors)}.so"
        done = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(lib), str(src)], check=False,
                              capture_output=True, text=True)
        if done.returncode == 0:
            library = ctypes.CDLL(str(lib))
            for dtype, ctype in (("float32", ctypes.c_float), ("float64", ctypes.c_double)):
                fn = getattr(library, f"fma_{dtype}")
                fn.restype = ctypes.c_double
                fn.argtypes = [ctypes.c_long, ctype, ctype, ctype]
            return library, [os.path.basename(cc)] + flags
        errors.append(done.stderr.strip().splitlines()[-1:] or ["failed"])
    raise RuntimeError(f"the micro-kernel does not compile: {errors}")


def _run_threads(fn, iterations, threads):
    """Wall seconds for ``threads`` threads each calling ``fn(iterations, ...)`` at once."""
    barrier = threading.Barrier(threads + 1)

    def work():
        barrier.wait()
        fn(iterations, 1.0, 0.999999, 1e-6)  # values stay near 1: no overflow, no denormals

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    start = time.perf_counter()
    barrier.wait()
    for t in pool:
        t.join()
    return time.perf_counter() - start


def measure(thread_counts, dtypes=("float32", "float64"), target_s=0.05, repeat=5):
    """Peak GFLOP/s per dtype and thread count: ``{"float32": {"1": {...}, "2": {...}}, ...}``, or
    ``{"error": why}``. Each figure is the best of ``repeat`` calls of about ``target_s`` seconds."""
    with tempfile.TemporaryDirectory(prefix="fastconv-bench-peak-") as directory:
        try:
            library, flags = build(directory)
        except (RuntimeError, OSError) as exc:
            return {"error": str(exc)}
        lanes_bytes, chains = library.vector_bytes(), library.chains()
        result = {"compiler": " ".join(flags), "vector_bits": 8 * lanes_bytes, "chains": chains}
        for dtype in dtypes:
            fn = getattr(library, f"fma_{dtype}")
            flops_per_iteration = 2 * chains * lanes_bytes // ITEM_BYTES[dtype]
            iterations = 1000
            while _run_threads(fn, iterations, 1) < target_s / 4:  # calibrate on one thread
                iterations *= 4
            fastest = min(_run_threads(fn, iterations, 1) for _ in range(3))  # the least disturbed
            iterations = max(1, int(iterations * target_s / max(fastest, 1e-9)))
            per_count = {}
            for threads in thread_counts:
                samples = [_run_threads(fn, iterations, threads) for _ in range(repeat)]
                flops = float(flops_per_iteration) * iterations * threads
                per_count[str(threads)] = {"flops": flops, "samples_s": samples,
                                           "gflops": flops / min(samples) / 1e9}
            result[dtype] = per_count
        return result


def merge(first, second):
    """Two measurements (before and after the benchmarks): the better of the two counts for each figure."""
    if "error" in first or "error" in second:
        return first if "error" not in first else second
    merged = dict(first)
    for key, per_count in first.items():
        if isinstance(per_count, dict):
            merged[key] = {threads: max(m, second[key][threads], key=lambda r: r["gflops"])
                           for threads, m in per_count.items()}
    return merged


def scaling(peak, dtype, threads):
    """The rate at ``threads`` threads over ``threads`` times the one-thread rate (near 1 on a quiet
    machine), or None where either was not measured."""
    per_count = peak.get(dtype) if isinstance(peak, dict) else None
    if not per_count or "1" not in per_count or str(threads) not in per_count:
        return None
    return per_count[str(threads)]["gflops"] / (threads * per_count["1"]["gflops"])


def rate(peak, dtype, threads):
    """The peak GFLOP/s at ``threads`` threads (the nearest measured count below), or None."""
    per_count = peak.get(dtype) if isinstance(peak, dict) else None
    if not per_count:
        return None
    counts = sorted(int(t) for t in per_count)
    usable = [t for t in counts if t <= threads] or counts[:1]
    return per_count[str(usable[-1])]["gflops"]
