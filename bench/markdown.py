"""The markdown rendering of a report (the dict that is also written as JSON)."""
from bench.benchmarks._network import BATCH, INFERENCE_IMAGES
from bench.cases import NETWORK

REFERENCE = "reference"
TORCH = "torch"


def format_seconds(seconds, unit=None):
    """Three significant digits in s, ms or µs; ``unit`` forces one of them."""
    if unit is None:
        unit = "s" if seconds >= 1 else "ms" if seconds >= 1e-3 else "µs"
    value = seconds * {"s": 1, "ms": 1e3, "µs": 1e6}[unit]
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{value:.{digits}f} {unit}", unit


def _time_columns(r):
    median, unit = format_seconds(r["median_s"])
    low = format_seconds(r["min_s"], unit)[0].split()[0]
    high = format_seconds(r["max_s"], unit)[0].split()[0]
    first = format_seconds(r["first_call_s"])[0]
    return median, f"{low}–{high}", first


def _ratio(value):
    return "" if value is None else f"{value:.2f}"


def _rate(r):
    if r.get("gflops") is None:
        return "", ""
    fraction = r.get("peak_fraction")
    return f"{r['gflops']:.1f}", ("" if fraction is None else f"{100 * fraction:.0f}")


def _row(r, leading):
    if "error" in r:
        return "| " + " | ".join(leading + [r["impl"], "failed: " + r["error"].replace("|", "/")[:80]]
                                 + [""] * (len(_TAIL) - 2)) + " |"
    median, spread, first = _time_columns(r)
    gflops, peak = _rate(r)
    n = len(r["samples_s"])
    return "| " + " | ".join(leading + [
        r["impl"], median, spread, first,
        _ratio(r.get("speedup_vs_reference")), _ratio(r.get("speedup_vs_torch")),
        gflops, peak, f"{n}x{r['number']}",
    ]) + " |"


_TAIL = ["impl", "median", "min–max", "first call", "× ref", "× torch", "GFLOP/s", "% peak", "samples"]


def _table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + rows


def _header(report):
    m, v, s = report["machine"], report["versions"], report["settings"]
    pools = ", ".join(f"{p.get('internal_api')} {p.get('version')} (threads: {p.get('num_threads')})"
                      for p in (m.get("thread_pools") or []) if p.get("user_api") == "blas") or m["blas"]
    peaks = ", ".join(f"{dtype} {p['gflops']:.1f} GFLOP/s" for dtype, p in report["gemm_peak"].items())
    n = next(iter(report["gemm_peak"].values()), {}).get("n")
    torch = (f"torch {v['torch']} (threads: {m['torch_threads']})" if v.get("torch")
             else "torch not measured")
    unavailable = [name for name, state in m["backends"].items() if state != "ok"]
    return [
        "## fastconv benchmarks",
        "",
        f"- CPU: {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['cpus_available']} available), "
        f"fastconv threads {m['fastconv_threads']}; BLAS: {pools}; OpenMP: {m['openmp']}",
        f"- Versions: python {v['python']}, numpy {v['numpy']}, fastconv {v['fastconv']}, "
        f"numba {v['numba']}, {torch}",
        f"- Backends measured: {', '.join(s['backends'])}"
        + (f" (unavailable: {', '.join(unavailable)})" if unavailable else ""),
        f"- GEMM peak (np.matmul {n}x{n}, best of {s['gemm_repeat']} calls before and as many after): {peaks}",
        f"- Command: `{report['command']}` ({report['wall_time_s']:.0f} s)",
        "",
        "Medians over samples (each the mean of a number of calls; `samples` = samples x calls), "
        "implementations interleaved round by round"
        + (f", each sample after {s['settle_time']:g} s of untimed calls of the same implementation"
           if s.get("settle_time") else "")
        + ". `first call`: on fresh state (JIT compilation, "
        "allocation), not in the median; for inference it is one batch of a fresh network. "
        "`× ref` = reference time / this time, `× torch` = PyTorch time / this time (above 1: faster). "
        "GFLOP/s counts the products of convolution and affine layers; `% peak` is of the GEMM peak "
        "in the same dtype.",
    ]


def render(report):
    results = report["results"]
    lines = _header(report)
    network = [r for r in results if r["layer"] == NETWORK]
    if network:
        lines += ["", f"### Network (batch {BATCH}; inference: time for {INFERENCE_IMAGES} images)", ""]
        rows = [_row(r, [r["kernel"], r["dtype"]]) for r in network]
        lines += _table(["benchmark", "dtype"] + _TAIL, rows)
    for dtype in report["settings"]["dtypes"]:
        kernels = [r for r in results if r["layer"] != NETWORK and r["dtype"] == dtype]
        if not kernels:
            continue
        lines += ["", f"### Kernels, {dtype}", ""]
        rows = [_row(r, [r["kernel"], r["layer"], r["shape"]]) for r in kernels]
        lines += _table(["kernel", "layer", "shape"] + _TAIL, rows)
    return "\n".join(lines) + "\n"
