"""``python -m bench``: the side-by-side report of every backend (and PyTorch) in one run."""
import argparse
import contextlib
import datetime
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import fastconv
from fastconv._threads import ENV_VAR as FASTCONV_THREADS_VAR
from bench import machine, markdown, torch_ops
from bench.cases import build_cases
from bench.timing import Impl, Settings, measure, summary

DTYPES = ("float32", "float64")
REPORTS_DIR = Path(__file__).resolve().parent / "reports"
SCHEMA = 1

# preset -> values of the options it changes (an option given explicitly wins)
PRESETS = {
    "full": dict(repeat=7, min_repeat=3, max_time=5.0, sample_time=0.01, settle_time=0.1, images=10_000, gemm_n=2048, gemm_repeat=5),
    "quick": dict(repeat=3, min_repeat=2, max_time=1.0, sample_time=0.005, settle_time=0.05, images=1000, gemm_n=1024, gemm_repeat=3),
    "smoke": dict(repeat=1, min_repeat=1, max_time=0.0, sample_time=0.0, settle_time=0.0, images=100, gemm_n=256, gemm_repeat=1),
}
# without --only, a smoke run times each kernel on the smallest layer of its kind, and the network
SMOKE_ONLY = ["*/conv1", "*/pool3", "*/relu7", "*/affine2", "*/network"]


def _csv(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time fastconv's kernels, a training step and inference at the chapter-8 network's "
                    "shapes, for every backend and PyTorch, interleaved in one process. "
                    "Run `python -m bench compare OLD.json NEW.json` to compare two reports.",
    )
    p.add_argument("--backends", type=_csv, help="comma-separated backends (default: every available one)")
    p.add_argument("--dtypes", type=_csv, default=list(DTYPES), help="comma-separated, default float32,float64")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even when it imports")
    p.add_argument("--only", action="append", metavar="PATTERN",
                   help="run only benchmarks whose id (kernel/layer, e.g. 'conv_*/conv2', 'train_step/*') "
                        "matches; may be repeated")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="fewer samples, inference on 1000 images (scaled): about a minute")
    mode.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                      help="one sample each, the smallest layer of each kind, inference on 100 images "
                           "(scaled): seconds; checks that everything runs, measures nothing reliably")
    p.add_argument("--repeat", type=int, help="samples per implementation (full run: 7)")
    p.add_argument("--min-repeat", type=int, help="fewest samples when a benchmark is slow (full run: 3)")
    p.add_argument("--max-time", type=float,
                   help="seconds of samples per implementation and benchmark after which --min-repeat "
                        "samples suffice (full run: 5)")
    p.add_argument("--sample-time", type=float, help="group fast calls so a sample lasts this long (0.01 s)")
    p.add_argument("--settle-time", type=float,
                   help="seconds of untimed calls before each sample, so that the thread pools of the "
                        "implementation measured before go quiet (full run: 0.1)")
    p.add_argument("--images", type=int, help="inference images, a multiple of 100, scaled to 10000 (10000)")
    p.add_argument("--gemm-n", type=int, help="size of the square matmul measuring the GEMM peak (2048)")
    p.add_argument("--gemm-repeat", type=int, help="matmul calls for the peak, best taken (5)")
    p.add_argument("--threads", type=int,
                   help="threads for everything measured: sets FASTCONV_NUM_THREADS and limits BLAS, OpenMP "
                        "and PyTorch pools (default: leave fastconv and BLAS as configured; PyTorch gets "
                        "fastconv's thread count)")
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="where to write the JSON report (default: bench/reports/report-<UTC time>.json)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also write the markdown table here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(preset="full")
    return p


def _resolve(args, parser):
    values = dict(PRESETS[args.preset])
    for key in values:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    for key in ("repeat", "min_repeat", "images", "gemm_n", "gemm_repeat"):
        if values[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    values["min_repeat"] = min(values["min_repeat"], values["repeat"])
    for dtype in args.dtypes:
        if dtype not in DTYPES:
            parser.error(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    available = fastconv.available_backends()
    backends = args.backends or available
    for name in backends:
        if name not in available:
            status = fastconv.backend_status().get(name, "unknown backend")
            parser.error(f"backend {name!r} is not available ({status}); available: {', '.join(available)}")
    return values, backends


def _record(case, m):
    if m.error is not None:
        return {"id": case.id, "kernel": case.kernel, "layer": case.layer, "shape": case.label,
                "dtype": case.dtype, "impl": m.impl, "impl_kind": "torch" if m.impl == markdown.TORCH else "backend",
                "error": m.error}
    median, low, high = summary(m.samples_s, case.scale)
    return {
        "id": case.id, "kernel": case.kernel, "layer": case.layer, "shape": case.label, "dtype": case.dtype,
        "impl": m.impl, "impl_kind": "torch" if m.impl == markdown.TORCH else "backend",
        "unit": case.unit, "scale": case.scale, "number": m.number,
        "samples_s": m.samples_s, "first_call_s": m.first_call_s,
        "median_s": median, "min_s": low, "max_s": high,
        "flops": case.flops, "gflops": case.flops / median / 1e9 if case.flops else None,
    }


def _gemm_peaks(dtypes, values, before=None):
    """The GEMM peak per dtype; measured again after the benchmarks, the best of both runs counts."""
    peaks = {}
    for dtype in dtypes:
        peak = machine.gemm_peak(np.dtype(dtype), values["gemm_n"], values["gemm_repeat"])
        if before is not None:
            peak["samples_s"] = before[dtype]["samples_s"] + peak["samples_s"]
            peak["gflops"] = peak["flops"] / min(peak["samples_s"]) / 1e9
        peaks[dtype] = peak
    return peaks


def _add_ratios(records):
    """Speed-ups against the reference and PyTorch measured in the same benchmark."""
    by_impl = {r["impl"]: r["median_s"] for r in records if "error" not in r}
    for r in records:
        if "error" in r:
            continue
        for key, other in (("speedup_vs_reference", markdown.REFERENCE), ("speedup_vs_torch", markdown.TORCH)):
            r[key] = by_impl[other] / r["median_s"] if other in by_impl else None


def _progress(index, total, case, records):
    times = ", ".join(f"{r['impl']} " + (f"FAILED ({r['error']})" if "error" in r
                                         else markdown.format_seconds(r["median_s"])[0]) for r in records)
    print(f"[{index}/{total}] {case.id} {case.dtype}: {times}", file=sys.stderr, flush=True)


def _limit_threads(n):
    """Limit the BLAS and OpenMP pools to ``n`` threads (fastconv's own count is set through its variable)."""
    fastconv.available_backends()  # import the backends so that their thread pools are loaded and limited
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n)


def run(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        # before any backend is imported, as a backend may read it at import time
        os.environ[FASTCONV_THREADS_VAR] = str(args.threads)
    values, backends = _resolve(args, parser)
    torch = None if args.no_torch else torch_ops.load_torch(num_threads=fastconv.get_num_threads())
    limits = _limit_threads(args.threads) if args.threads is not None else contextlib.nullcontext()
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    with limits:
        return _run(args, parser, values, backends, torch, command.strip())


def _run(args, parser, values, backends, torch, command):
    settings = Settings(values["repeat"], values["min_repeat"], values["max_time"], values["sample_time"],
                        settle_time=values["settle_time"])
    impls = [Impl(name) for name in backends] + ([Impl(markdown.TORCH, is_backend=False)] if torch else [])
    only = args.only or (SMOKE_ONLY if args.preset == "smoke" else None)
    cases = build_cases(args.dtypes, values["images"], only)
    if not cases:
        parser.error(f"no benchmark matches --only {' '.join(only)}")

    started = time.perf_counter()
    log = (lambda *a: None) if args.quiet else _progress
    peaks = _gemm_peaks(args.dtypes, values)
    results = []
    for index, case in enumerate(cases, 1):
        records = [_record(case, m) for m in measure(case, impls, settings)]
        _add_ratios(records)
        log(index, len(cases), case, records)
        results += records
    peaks = _gemm_peaks(args.dtypes, values, before=peaks)
    for r in results:
        gflops = r.get("gflops")
        r["peak_fraction"] = None if gflops is None else gflops / peaks[r["dtype"]]["gflops"]

    report = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "wall_time_s": time.perf_counter() - started,
        "settings": dict(values, preset=args.preset, backends=backends, dtypes=args.dtypes,
                         torch=torch is not None, only=only, threads=args.threads),
        "machine": machine.collect(torch),
        "versions": machine.versions(torch),
        "gemm_peak": peaks,
        "results": results,
    }
    return report, args


def _default_json_path(report):
    stamp = report["created"].replace(":", "").replace("-", "").replace("+0000", "Z")
    return REPORTS_DIR / f"report-{stamp}.json"


def main(argv=None):
    with warnings.catch_warnings():
        # backends that fail to import are listed in the report; their warnings would only repeat that
        warnings.filterwarnings("ignore", message="fastconv backend", category=RuntimeWarning)
        report, args = run(argv)
    text = markdown.render(report)
    json_path = args.json or _default_json_path(report)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    sys.stdout.write(text)
    print(f"\nJSON report: {json_path}", file=sys.stderr)
    failed = [f"{r['id']} {r['dtype']} {r['impl']}: {r['error']}" for r in report["results"] if "error" in r]
    if failed:
        print(f"\n{len(failed)} benchmarks FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0
