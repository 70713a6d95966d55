"""``python -m bench``: every backend and PyTorch side by side, each in a process of its own.

This process imports neither fastconv nor PyTorch: it starts one worker
process per implementation (``bench.worker``) and has them take their samples
in turns (``bench.timing``). The PyTorch worker never imports fastconv, so the
yardstick runs as in a program of its own; to show that it does, PyTorch's
train step is also timed alone, in a fresh process while no fastconv process
exists, before and after the benchmarks.
"""
import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import cases as bench_cases
from bench import machine, markdown, peak
from bench.benchmarks import _shapes
from bench.procs import ProcessRunner
from bench.timing import RemoteError, Settings, measure, summary
from bench.variants import VARIANT_KERNELS, VARIANTS

BASELINE_BACKEND = "cython"  # the backend --baseline measures from another tree

DTYPES = ("float32", "float64")
REPORTS_DIR = Path(__file__).resolve().parent / "reports"
SCHEMA = 2
TORCH = markdown.TORCH
REFERENCE = markdown.REFERENCE
# the environment as this process got it: workers start from it, never from anything changed later
_START_ENV = dict(os.environ)

# preset -> values of the options it changes (an option given explicitly wins)
PRESETS = {
    "full": dict(repeat=5, min_repeat=3, max_time=0.5, sample_time=0.02, settle_time=0.1, network_settle_time=1.0,
                 images=10_000,
                 network_repeat=11, alone_repeat=11, kernels="all", gemm_n=2048, gemm_repeat=3, peak_repeat=5),
    "quick": dict(repeat=3, min_repeat=2, max_time=0.5, sample_time=0.005, settle_time=0.05,
                  network_settle_time=0.25, images=1000,
                  network_repeat=5, alone_repeat=5, kernels="conv", gemm_n=1024, gemm_repeat=2, peak_repeat=3),
    "smoke": dict(repeat=1, min_repeat=1, max_time=0.0, sample_time=0.0, settle_time=0.0, network_settle_time=0.0,
                  images=100,
                  network_repeat=1, alone_repeat=1, kernels="all", gemm_n=256, gemm_repeat=1, peak_repeat=1),
}
# without --only, a smoke run times each kernel on the smallest layer of its kind, and the network
SMOKE_ONLY = ["*/conv1", "*/pool3", "*/relu7", "*/affine2", "*/network"]
# variables that hold a library's pool to --threads threads, set for every worker alike
THREAD_VARS = ("FASTCONV_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMBA_NUM_THREADS")


def _tree_label(tree):
    """The short commit of a source tree, or its folder's name where git cannot tell."""
    try:
        done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              check=False, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        done = None
    return done.stdout.strip() if done is not None and done.returncode == 0 else Path(tree).resolve().name


def _csv(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time fastconv's backends and PyTorch at the chapter-8 network's shapes (train step, "
                    "inference, every kernel at every layer), each implementation in a process of its own, "
                    "taking samples in turns. Run `python -m bench compare OLD.json NEW.json` to compare two "
                    "reports.",
    )
    p.add_argument("--backends", type=_csv,
                   help="comma-separated implementations: backends and variants such as cython-im2col "
                        "(default: every available backend and variant)")
    p.add_argument("--dtypes", type=_csv, default=list(DTYPES), help="comma-separated, default float32,float64")
    p.add_argument("--inference-dtypes", type=_csv, default=["float32"],
                   help="comma-separated dtypes of the inference benchmark (default float32; float64 adds about "
                        "2.5 minutes to a full run)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even when it imports")
    p.add_argument("--only", action="append", metavar="PATTERN",
                   help="run only benchmarks whose id (kernel/layer, e.g. 'conv_*/conv2', 'train_step/*') "
                        "matches; may be repeated")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="fewer samples, the convolution kernels only, inference on 1000 images (scaled)")
    mode.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                      help="one sample each, the smallest layer of each kind, inference on 100 images "
                           "(scaled): seconds; checks that everything runs, measures nothing reliably")
    p.add_argument("--kernels", choices=("all", "conv", "none"),
                   help="kernel benchmarks besides the network: all (full run), conv (forward and backward "
                        "convolutions only; --quick) or none")
    p.add_argument("--repeat", type=int, help="samples per implementation (full run: 5)")
    p.add_argument("--min-repeat", type=int, help="fewest samples when a benchmark is slow (full run: 3)")
    p.add_argument("--max-time", type=float,
                   help="seconds of samples per implementation and benchmark after which --min-repeat "
                        "samples suffice (full run: 0.5; train step: 5; inference: 8)")
    p.add_argument("--network-repeat", type=int, help="samples of each train step (full run: 11)")
    p.add_argument("--alone-repeat", type=int,
                   help="samples of PyTorch's train step alone, before and after the benchmarks each "
                        "(full run: 11; 0 leaves the check out)")
    p.add_argument("--sample-time", type=float, help="group fast calls so a sample lasts this long (0.02 s)")
    p.add_argument("--settle-time", type=float,
                   help="seconds of untimed calls before each sample, so that the thread pools of the "
                        "implementation measured before go quiet (full run: 0.1)")
    p.add_argument("--network-settle-time", type=float,
                   help="--settle-time for the train step and inference (full run: 1.0): measured, 0.1 s "
                        "left PyTorch's step 10-30 %% slower in the benchmark than alone on a 2-core machine")
    p.add_argument("--images", type=int, help="inference images, a multiple of 100, scaled to 10000 (10000)")
    p.add_argument("--gemm-n", type=int, help="size of the square np.matmul measuring NumPy's GEMM rate (2048)")
    p.add_argument("--gemm-repeat", type=int, help="matmul calls for the GEMM rate, best taken (3)")
    p.add_argument("--peak-repeat", type=int, help="calls of the FMA micro-kernel per figure, best taken (5)")
    p.add_argument("--threads", type=int,
                   help="threads for every implementation: sets " + ", ".join(THREAD_VARS) + " for every "
                        "worker and PyTorch's intra-op threads (default: as configured; PyTorch gets "
                        "fastconv's thread count)")
    p.add_argument("--baseline", type=Path, metavar="TREE",
                   help="also measure the cython backend of another fastconv source tree (a checkout with its "
                        "extensions built in place, e.g. a git worktree of an older commit), as cython@<commit>, "
                        "on the convolutions and the train step")
    p.add_argument("--cold-numba-cache", action="store_true",
                   help="give the fastconv processes an empty numba cache, so that the numba backend's "
                        "first calls include compiling its kernels")
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="where to write the JSON report (default: bench/reports/report-<UTC time>.json)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also write the markdown report here")
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
    for key in ("repeat", "min_repeat", "images", "gemm_n", "gemm_repeat", "network_repeat", "peak_repeat"):
        if values[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    for key in ("alone_repeat", "settle_time", "network_settle_time"):
        if values[key] < 0:
            parser.error(f"--{key.replace('_', '-')} must not be negative")
    values["min_repeat"] = min(values["min_repeat"], values["repeat"])
    for dtype in args.dtypes + args.inference_dtypes:
        if dtype not in DTYPES:
            parser.error(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return values


def _worker_env(args):
    env = dict(_START_ENV)
    if args.threads is not None:
        env.update({name: str(args.threads) for name in THREAD_VARS})
    return env


def _record(case, m, kind):
    base = {"id": case.id, "kernel": case.kernel, "layer": case.layer, "shape": case.label, "dtype": case.dtype,
            "impl": m.impl, "impl_kind": kind}
    if m.error is not None:
        return dict(base, error=m.error)
    median, low, high = summary(m.samples_s, case.scale)
    return dict(
        base, unit=case.unit, scale=case.scale, number=m.number,
        samples_s=m.samples_s, first_call_s=m.first_call_s,
        median_s=median, min_s=low, max_s=high,
        flops=case.flops, gflops=case.flops / median / 1e9 if case.flops else None,
    )


def _add_ratios(records):
    """Speed-up over the reference and time relative to PyTorch, both measured in the same benchmark."""
    by_impl = {r["impl"]: r["median_s"] for r in records if "error" not in r}
    for r in records:
        if "error" in r:
            continue
        r["speedup_vs_reference"] = by_impl[REFERENCE] / r["median_s"] if REFERENCE in by_impl else None
        r["time_vs_torch"] = r["median_s"] / by_impl[TORCH] if TORCH in by_impl else None


def _progress(index, total, case, records):
    times = ", ".join(f"{r['impl']} " + (f"FAILED ({r['error']})" if "error" in r
                                         else markdown.format_seconds(r["median_s"])[0]) for r in records)
    print(f"[{index}/{total}] {case.id} {case.dtype}: {times}", file=sys.stderr, flush=True)


class _Run:
    """The state of one report run: options, workers, notes."""

    def __init__(self, args, parser, values):
        self.args, self.parser, self.values = args, parser, values
        self.baseline_name = None  # the implementation measured from --baseline
        self.notes = []  # what was left out, and why
        self.settings = Settings(values["repeat"], values["min_repeat"], values["max_time"],
                                 values["sample_time"], settle_time=values["settle_time"])

    # --- the facts of the run, from a short-lived fastconv process -------------------------------
    def probe(self, env, params_dir):
        probe = ProcessRunner({"kind": "probe", "name": "probe"}, env)
        try:
            facts = probe.describe()
            for dtype in self.args.dtypes:
                probe.request("params", dtype=dtype, path=str(Path(params_dir) / f"{dtype}.npz"))
        finally:
            probe.close()
        return facts

    def choose_impls(self, available):
        """The fastconv implementations to measure, in order: each backend, then its variants; and
        ``{variant or baseline: the backend it is set against}``."""
        known, baselines = [], {}
        for backend in available:
            known.append(backend)
            for variant, (of, _) in VARIANTS.items():
                if of == backend:
                    known.append(variant)
                    baselines[variant] = backend
        wanted = self.args.backends or known
        for name in wanted:
            if name not in known:
                self.parser.error(f"{name!r} is not available; available: {', '.join(known)}")
        names = [name for name in known if name in wanted]
        if self.args.baseline is not None:
            self.baseline_name = f"{BASELINE_BACKEND}@{_tree_label(self.args.baseline)}"
            names.insert(names.index(BASELINE_BACKEND) + 1 if BASELINE_BACKEND in names else 0, self.baseline_name)
            baselines[self.baseline_name] = BASELINE_BACKEND
        return names, baselines

    def start_runners(self, names, env, torch_spec):
        verbose = not self.args.quiet  # tracebacks of failures on stderr
        runners = []
        for name in names:
            spec = {"kind": "backend", "name": name, "backend": name, "verbose": verbose}
            covers = None
            if name in VARIANTS:
                spec["backend"], spec["variant"] = VARIANTS[name]
            elif name == self.baseline_name:
                spec["backend"], spec["source"] = BASELINE_BACKEND, str(self.args.baseline)
            if name in VARIANTS or name == self.baseline_name:
                covers = lambda case: case.kernel in VARIANT_KERNELS  # noqa: E731
            runners.append(ProcessRunner(spec, env, covers=covers))
        if torch_spec is not None:
            runners.append(ProcessRunner(torch_spec, env))
        for runner in runners:
            runner.start()  # all import at once
        kept = []
        for runner in runners:
            try:
                facts = runner.describe()
            except RemoteError as exc:
                self.notes.append(f"{runner.name} not measured: {exc}")
                runner.close()
                continue
            if facts.get("variant_error"):
                self.notes.append(f"{runner.name} not measured: {facts['variant_error']}")
                runner.close()
                continue
            if runner.kind == "torch" and facts["fastconv_imported"]:
                raise RuntimeError("fastconv was imported in the PyTorch process")
            kept.append(runner)
        return kept

    # --- PyTorch alone --------------------------------------------------------------------------
    def torch_alone(self, torch_spec, env, cases):
        """Train-step samples of PyTorch in a fresh process while no fastconv process runs."""
        runner = ProcessRunner(dict(torch_spec, name=TORCH), env)
        settings = Settings(self.values["alone_repeat"], self.values["alone_repeat"], 0.0,
                            self.values["sample_time"], settle_time=self.values["settle_time"])
        out = {}
        try:
            for case in cases:
                (m,) = measure(dataclasses.replace(case, repeat=None), [runner], settings)
                out[case.dtype] = m
        finally:
            runner.close()
        return out


def _alone_summary(before, after, records):
    """The yardstick check: PyTorch alone against PyTorch in the benchmark, per dtype."""
    check = {}
    for dtype, m in before.items():
        samples = m.samples_s + (after[dtype].samples_s if dtype in after else [])
        errors = [x.error for x in (m, after.get(dtype)) if x is not None and x.error]
        inside = next((r for r in records if r["kernel"] == bench_cases.TRAIN_STEP and r["dtype"] == dtype
                       and r["impl"] == TORCH and "error" not in r), None)
        entry = {"alone_samples_s": samples, "errors": errors}
        if samples:
            entry["alone_median_s"] = summary(samples)[0]
        if inside is not None:
            entry["benchmark_median_s"] = inside["median_s"]
            if samples:
                entry["benchmark_vs_alone"] = inside["median_s"] / entry["alone_median_s"]
        check[dtype] = entry
    return check


def _measure_all(cases, runners, settings, log):
    """Every case on the runners that take part in it; the result records, in order."""
    results = []
    for index, case in enumerate(cases, 1):
        taking_part = [r for r in runners if r.covers(case)]
        started = time.perf_counter()
        measured = measure(case, taking_part, settings)
        wall = time.perf_counter() - started
        records = [dict(_record(case, m, r.kind), case_wall_s=wall) for r, m in zip(taking_part, measured)]
        _add_ratios(records)
        log(index, len(cases), case, records)
        results += records
    return results


def _add_peak_fractions(results, fma, threads, dtypes):
    """Each rate as a fraction of the FMA peak at ``threads`` threads; returns notes on the peak."""
    for r in results:
        rate = peak.rate(fma, r["dtype"], threads) if r.get("gflops") else None
        r["peak_fraction"] = None if rate is None else r["gflops"] / rate
    notes = []
    for dtype in dtypes:
        ratio = peak.scaling(fma, dtype, threads) if threads > 1 else None
        if ratio is not None and ratio < 0.85:
            notes.append(f"the {dtype} FMA peak on {threads} threads is {100 * ratio:.0f} % of {threads} times the "
                         "one-thread peak: other processes were using the CPUs, and `% FMA peak` figures are "
                         "overstated")
    return notes


def run(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    values = _resolve(args, parser)
    if args.baseline is not None and not (args.baseline / "fastconv" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a fastconv source tree (no fastconv/__init__.py)")
    log = (lambda *a: None) if args.quiet else _progress
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_at_start and load_at_start[0] >= 0.5 and not args.quiet:
        print(f"warning: load average {load_at_start[0]:.1f}: other processes are using the CPUs, and the figures "
              "will show it; a report to keep wants a quiet machine", file=sys.stderr)
    state = _Run(args, parser, values)
    with tempfile.TemporaryDirectory(prefix="fastconv-bench-") as temp:
        env = _worker_env(args)
        if args.cold_numba_cache:
            env["NUMBA_CACHE_DIR"] = str(Path(temp) / "numba-cache")
        try:
            facts = state.probe(env, temp)
        except RemoteError as exc:
            parser.error(f"fastconv does not import in a worker process: {exc}")
        names, baselines = state.choose_impls(facts["available"])
        threads = facts["fastconv_threads"]
        shapes = _shapes.network_from_dict(facts["shapes"])
        only = args.only or (SMOKE_ONLY if args.preset == "smoke" else None)
        cases = bench_cases.build_cases(shapes, args.dtypes, values["images"], only,
                                        kernels=values["kernels"], network_repeat=values["network_repeat"],
                                        inference_dtypes=args.inference_dtypes,
                                        network_settle_time=values["network_settle_time"])
        if not cases:
            parser.error(f"no benchmark matches --only {' '.join(only)}")
        if not args.no_torch and importlib.util.find_spec("torch") is None:  # looked up, not imported
            state.notes.append("PyTorch not measured: it is not installed (pip install fastconv[torch])")
        torch_spec = None if args.no_torch or importlib.util.find_spec("torch") is None else {
            "kind": "torch", "name": TORCH, "threads": args.threads or threads, "verbose": not args.quiet,
            "shapes": facts["shapes"], "params_dir": temp}

        thread_counts = sorted({1, min(2, machine.cpu_count()), threads})
        peak_before = peak.measure(thread_counts, args.dtypes, repeat=values["peak_repeat"])
        train_cases = [c for c in cases if c.kernel == bench_cases.TRAIN_STEP]
        alone_before, alone_after = {}, {}
        if torch_spec and train_cases and values["alone_repeat"]:
            try:
                alone_before = state.torch_alone(torch_spec, env, train_cases)
            except RemoteError as exc:
                state.notes.append(f"PyTorch alone not measured: {exc}")

        runners = state.start_runners(names, env, torch_spec)
        try:
            reference = next((r for r in runners if r.name == REFERENCE), runners[0])
            gemm = {dtype: reference.request("gemm_peak", dtype=dtype, n=values["gemm_n"],
                                             repeat=values["gemm_repeat"]) for dtype in args.dtypes}
            results = _measure_all(cases, runners, state.settings, log)
            worker_facts = {r.name: r.facts for r in runners}
        finally:
            for r in runners:
                r.close()

        if alone_before:
            try:
                alone_after = state.torch_alone(torch_spec, env, train_cases)
            except RemoteError as exc:
                state.notes.append(f"PyTorch alone (after) not measured: {exc}")
        peak_after = peak.measure(thread_counts, args.dtypes, repeat=values["peak_repeat"])
    fma = peak.merge(peak_before, peak_after)
    state.notes += _add_peak_fractions(results, fma, threads, args.dtypes)

    torch_facts = worker_facts.get(TORCH)
    report = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command.strip(),
        "wall_time_s": time.perf_counter() - started,
        "settings": dict(values, preset=args.preset, impls=[r.name for r in runners], dtypes=args.dtypes,
                         torch=torch_facts is not None, only=only, threads=args.threads,
                         cold_numba_cache=args.cold_numba_cache, baselines=baselines,
                         baseline_tree=str(args.baseline.resolve()) if args.baseline else None),
        "machine": dict(machine.cpu_facts(env), load_average_at_start=load_at_start, fastconv_threads=threads,
                        torch_threads=torch_facts["torch_threads"] if torch_facts else None),
        "fastconv": {"info": facts["info"], "thread_pools": facts["thread_pools"], "versions": facts["versions"]},
        "workers": worker_facts,
        "fma_peak": fma,
        "gemm_peak": gemm,
        "yardstick": _alone_summary(alone_before, alone_after, results) if alone_before else None,
        "notes": state.notes,
        "results": results,
    }
    return report, args


def _default_json_path(report):
    stamp = report["created"].replace(":", "").replace("-", "").replace("+0000", "Z")
    return REPORTS_DIR / f"report-{stamp}.json"


def main(argv=None):
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
    failed = [f"{r['id']} {r['dtype']} {r['impl']}: {r['error'].splitlines()[0]}"
              for r in report["results"] if "error" in r]
    if failed:
        print(f"\n{len(failed)} benchmarks FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0
