"""The markdown rendering of a report (the dict that is also written as JSON)."""
from bench.benchmarks._shapes import BATCH, INFERENCE_IMAGES

REFERENCE = "reference"
TORCH = "torch"
NETWORK = "network"
CONV_KERNELS = ("conv_forward", "conv_backward")
IM2COL_VARIANT = "cython-im2col"


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


_TAIL = ["impl", "median", "min–max", "first call", "speed-up vs reference", "time vs PyTorch", "GFLOP/s",
         "% FMA peak", "samples"]


def _row(r, leading):
    if "error" in r:
        return "| " + " | ".join(leading + [r["impl"], "failed: " + r["error"].splitlines()[0].replace("|", "/")[:80]]
                                 + [""] * (len(_TAIL) - 2)) + " |"
    median, spread, first = _time_columns(r)
    gflops, peak = _rate(r)
    return "| " + " | ".join(leading + [
        r["impl"], median, spread, first,
        _ratio(r.get("speedup_vs_reference")), _ratio(r.get("time_vs_torch")),
        gflops, peak, f"{len(r['samples_s'])}x{r['number']}",
    ]) + " |"


def _table(head, rows):
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + rows


def _peak_line(report):
    fma = report.get("fma_peak") or {}
    if "error" in fma:
        return f"- FMA peak: not measured ({fma['error']})"
    parts = []
    for dtype in report["settings"]["dtypes"]:
        counts = fma.get(dtype, {})
        parts.append(f"{dtype} " + ", ".join(f"{m['gflops']:.0f} GFLOP/s on {t} thread{'s' if t != '1' else ''}"
                                             for t, m in counts.items()))
    return (f"- FMA peak (a micro-kernel of {fma.get('chains')} independent {fma.get('vector_bits')}-bit FMA "
            f"chains, built for this CPU with `{fma.get('compiler')}`, best of the runs before and after the "
            f"benchmarks): " + "; ".join(parts))


def _gemm_line(report):
    parts = []
    for dtype, g in (report.get("gemm_peak") or {}).items():
        parts.append(f"{dtype} {g['gflops']:.0f} GFLOP/s")
    n = next(iter((report.get("gemm_peak") or {}).values()), {}).get("n")
    return f"- NumPy's GEMM (np.matmul {n}x{n}, best call): " + ", ".join(parts) if parts else None


def _loads(values):
    return "/".join(f"{x:.1f}" for x in values) if values else "unknown"


def _header(report):
    m, s, fc = report["machine"], report["settings"], report["fastconv"]
    info, versions = fc["info"], fc["versions"]
    pools = ", ".join(f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
                      for p in (fc.get("thread_pools") or []) if p.get("user_api") == "blas") or info.get("blas")
    torch = report["workers"].get(TORCH)
    unavailable = [name for name, state in info["backends"].items() if state != "ok"]
    env = ", ".join(f"{k}={v}" for k, v in m["environment"].items()) or "none set"
    lines = [
        "## fastconv benchmarks",
        "",
        f"- CPU: {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['cpus_available']} available), "
        f"{' '.join(m['simd'])}; load average (1, 5, 15 min) at the start {_loads(m.get('load_average_at_start'))}, "
        f"at the end {_loads(m['load_average'])}",
        f"- Threads: fastconv {m['fastconv_threads']}"
        + (f", PyTorch {m['torch_threads']}" if m.get("torch_threads") else "") + "; thread variables of "
        f"every measuring process: {env}",
        f"- fastconv {versions['fastconv']}: numpy {versions['numpy']}, BLAS {pools}, "
        f"compiled kernels on {info.get('pool')}, numba {versions['numba']}; python {m['python']}"
        + (f"; torch {torch['torch']}" if torch else "; PyTorch not measured"),
        f"- Implementations measured: {', '.join(s['impls'])}"
        + (f" (unavailable backends: {', '.join(unavailable)})" if unavailable else ""),
        _peak_line(report),
        _gemm_line(report),
        f"- Command: `{report['command']}` ({report['wall_time_s']:.0f} s)",
    ]
    lines += [f"- Note: {note}" for note in report.get("notes", [])]
    lines += [
        "",
        "Each implementation runs in a process of its own, started for the run: one per fastconv backend "
        "(set as a user sets it)"
        + (f", one for `{IM2COL_VARIANT}` (the cython backend with its convolutions forced onto its im2col + "
           "GEMM path)" if IM2COL_VARIANT in s["impls"] else "")
        + (f", one for `{_tree_baseline(s)}` (the cython backend of the source tree {s['baseline_tree']})"
           if _tree_baseline(s) else "")
        + (", one for PyTorch, which never imports fastconv" if TORCH in s["impls"] else "")
        + ". The processes take their samples in turns, the order rotated every round, on the same machine"
        + (f"; before each sample an implementation runs untimed for {s['settle_time']:g} s"
           + (f" ({s['network_settle_time']:g} s for the train step and inference)"
              if s.get("network_settle_time") not in (None, s["settle_time"]) else "")
           + ", so that the threads of the one measured before go quiet" if s.get("settle_time") else "")
        + "; after each sample taken in a worker process, the next waits until that process has used no CPU "
        "for 30 ms"
        + ". Medians over samples (each the mean of a number of calls; `samples` = samples x calls). "
        "`first call`: on fresh state in a fresh process (JIT compilation, allocation), not in the median; "
        "for inference it is one batch of a fresh network. `speed-up vs reference` = reference time / this "
        "time; `time vs PyTorch` = this time / PyTorch's (below 1: faster than PyTorch). GFLOP/s counts the "
        "products of convolution and affine layers; `% FMA peak` is of the FMA peak in the same dtype at "
        "fastconv's thread count.",
    ]
    return [line for line in lines if line is not None]


def _baselines(settings):
    """{baseline implementation: the implementation it is set against}, for those measured."""
    pairs = settings.get("baselines") or {IM2COL_VARIANT: "cython"}
    return {b: of for b, of in pairs.items() if b in settings["impls"] and of in settings["impls"]}


def _tree_baseline(settings):
    return next((b for b in _baselines(settings) if "@" in b), None)


def _yardstick(report):
    check = report.get("yardstick")
    if not check:
        return []
    lines = ["", "### The PyTorch yardstick, alone and in the benchmark", "",
             "PyTorch's train step timed alone (a fresh PyTorch process while no fastconv process exists, "
             "before and after the benchmarks) and in the benchmark (taking turns with fastconv's "
             "processes). The same time in both says that the benchmark does not slow the yardstick down.", ""]
    rows = []
    for dtype, c in check.items():
        alone = format_seconds(c["alone_median_s"])[0] if "alone_median_s" in c else "failed"
        inside = format_seconds(c["benchmark_median_s"])[0] if "benchmark_median_s" in c else "failed"
        rows.append(f"| train_step | {dtype} | {alone} ({len(c['alone_samples_s'])} samples) | {inside} | "
                    f"{_ratio(c.get('benchmark_vs_alone'))} |")
    return lines + _table(["benchmark", "dtype", "PyTorch alone", "PyTorch in the benchmark",
                           "in the benchmark / alone"], rows)


def _conv_cell(r):
    if r is None:
        return ""
    if "error" in r:
        return "failed"
    fraction = r.get("peak_fraction")
    gflops = f"{r['gflops']:.0f}" if r["gflops"] >= 10 else f"{r['gflops']:.1f}"
    return (f"{format_seconds(r['median_s'])[0]} · {gflops} GF/s"
            + ("" if fraction is None else f" · {100 * fraction:.0f} %"))


def _conv_layers(report, dtype):
    rows_by_key = {}
    for r in report["results"]:
        if r["dtype"] == dtype and r["kernel"] in CONV_KERNELS:
            rows_by_key.setdefault((r["layer"], r["kernel"]), {})[r["impl"]] = r
    if not rows_by_key:
        return []
    impls = [i for i in report["settings"]["impls"] if any(i in v for v in rows_by_key.values())]
    baselines = {b: of for b, of in _baselines(report["settings"]).items() if b in impls}
    head = ["layer", "kernel"] + impls + [f"{b} / {of}" for b, of in baselines.items()]
    rows = []
    order = sorted(rows_by_key, key=lambda key: (key[0], CONV_KERNELS.index(key[1])))  # each layer's pair together
    for layer, kernel in order:
        by_impl = rows_by_key[(layer, kernel)]
        cells = [layer, kernel.replace("conv_", "")] + [_conv_cell(by_impl.get(i)) for i in impls]
        for b, of in baselines.items():
            old, new = by_impl.get(b), by_impl.get(of)
            ok = old and new and "error" not in old and "error" not in new
            cells.append(_ratio(old["median_s"] / new["median_s"]) if ok else "")
        rows.append("| " + " | ".join(cells) + " |")
    return (["", f"### Convolutions per layer, {dtype}", "",
             "Median time · GFLOP/s · % of the FMA peak"
             + ("; `A / B` columns: A's time over B's, the speed-up of B over A" if baselines else "")
             + ". Backward includes dW, db and dx.", ""]
            + _table(head, rows))


def _summary_cell(r):
    if r is None:
        return ""
    if "error" in r:
        return "failed"
    parts = [format_seconds(r["median_s"])[0]]
    if r.get("time_vs_torch") is not None and r["impl"] != TORCH:
        parts.append(f"{r['time_vs_torch']:.2f}x PyTorch's time")
    speedup = r.get("speedup_vs_reference")
    if speedup is not None and r["impl"] != REFERENCE:
        parts.append(f"{speedup:.1f}x faster than the reference" if speedup >= 1
                     else f"{1 / speedup:.1f}x slower than the reference")
    return " · ".join(parts)


def _faster_than(results, impl, baseline):
    """(convolution benchmarks where ``impl`` beats ``baseline``, benchmarks compared)."""
    theirs = {(r["id"], r["dtype"]): r["median_s"] for r in results
              if r["impl"] == baseline and "error" not in r and r["kernel"] in CONV_KERNELS}
    mine = [r for r in results if r["impl"] == impl and (r["id"], r["dtype"]) in theirs]
    ok = [r for r in mine if "error" not in r and r["median_s"] < theirs[(r["id"], r["dtype"])]]
    return len(ok), len(mine)


def _summary(report):
    results = report["results"]
    network = [r for r in results if r["layer"] == NETWORK]
    columns = list(dict.fromkeys((r["kernel"], r["dtype"]) for r in network))
    if not columns:
        return []
    baselines = [b for b in _baselines(report["settings"])
                 if any(r["impl"] == b for r in results if r["kernel"] in CONV_KERNELS)]
    head = (["impl"] + [f"{kernel.replace('_', ' ')}, {dtype}" for kernel, dtype in columns]
            + [f"convolutions faster than {b}" for b in baselines])
    rows = []
    for impl in report["settings"]["impls"]:
        by_key = {(r["kernel"], r["dtype"]): r for r in network if r["impl"] == impl}
        cells = [impl] + [_summary_cell(by_key.get(key)) for key in columns]
        for b in baselines:
            faster, compared = _faster_than(results, impl, b)
            cells.append(f"{faster} of {compared}" if compared and impl != b else "")
        rows.append("| " + " | ".join(cells) + " |")
    return (["", f"### Summary (medians; batch {BATCH}; inference of {INFERENCE_IMAGES} images)", ""]
            + _table(head, rows))


def render(report):
    results = report["results"]
    lines = _header(report) + _summary(report) + _yardstick(report)
    network = [r for r in results if r["layer"] == NETWORK]
    if network:
        lines += ["", f"### Network (batch {BATCH}; inference: time for {INFERENCE_IMAGES} images)", ""]
        lines += _table(["benchmark", "dtype"] + _TAIL, [_row(r, [r["kernel"], r["dtype"]]) for r in network])
    for dtype in report["settings"]["dtypes"]:
        lines += _conv_layers(report, dtype)
    for dtype in report["settings"]["dtypes"]:
        kernels = [r for r in results if r["layer"] != NETWORK and r["dtype"] == dtype]
        if kernels:
            lines += ["", f"### Kernels, {dtype}", ""]
            lines += _table(["kernel", "layer", "shape"] + _TAIL,
                            [_row(r, [r["kernel"], r["layer"], r["shape"]]) for r in kernels])
    return "\n".join(lines) + "\n"
