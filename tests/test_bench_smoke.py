"""The benchmark tools in ``bench/``: shapes, timing loop, report and compare (no timing is judged here)."""
import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import fastconv

# `bench` lives at the repository root; appended, so that an installed fastconv still wins
sys.path.append(str(Path(__file__).resolve().parents[1]))

from conftest import assert_close_to_reference  # noqa: E402

from bench import compare, peak, report  # noqa: E402
from bench.benchmarks import _network as net  # noqa: E402
from bench.benchmarks import _shapes  # noqa: E402
from bench.cases import Case  # noqa: E402
from bench.procs import ProcessRunner, wait_until_idle  # noqa: E402
from bench.timing import LocalRunner, RemoteError, Settings, measure  # noqa: E402

# --- the shapes the benchmarks run on ----------------------------------------

def test_network_shapes_are_the_chapter8_networks():
    shapes = net.network_shapes()
    # worked out by hand from the book's network: 28x28 input, 3x3 filters, 2x2/2 pools
    assert [(c.x_shape, c.w_shape, c.pad) for c in shapes.conv] == [
        ((100, 1, 28, 28), (16, 1, 3, 3), 1),
        ((100, 16, 28, 28), (16, 16, 3, 3), 1),
        ((100, 16, 14, 14), (32, 16, 3, 3), 1),
        ((100, 32, 14, 14), (32, 32, 3, 3), 2),
        ((100, 32, 8, 8), (64, 32, 3, 3), 1),
        ((100, 64, 8, 8), (64, 64, 3, 3), 1),
    ]
    assert [c.out_shape for c in shapes.conv][3] == (100, 32, 16, 16)
    assert [(p.x_shape, p.out_shape) for p in shapes.pool] == [
        ((100, 16, 28, 28), (100, 16, 14, 14)),
        ((100, 32, 16, 16), (100, 32, 8, 8)),
        ((100, 64, 8, 8), (100, 64, 4, 4)),
    ]
    assert [(a.x_shape, a.w_shape) for a in shapes.affine] == [((100, 64, 4, 4), (1024, 50)), ((100, 50), (50, 10))]
    assert [r.name for r in shapes.relu] == ["relu1", "relu3", "relu4", "relu5", "relu7"]
    # 2 flops per multiply-add: N * out_h * out_w * FN * C * FH * FW
    assert shapes.conv[0].flops == 2 * 100 * 28 * 28 * 16 * 1 * 9 == 22_579_200
    assert shapes.affine[0].flops == 2 * 100 * 1024 * 50


# --- the timing loop ------------------------------------------------------------

def _fake_case(**fields):
    return Case("fake", "layer", "", "float64", **dict({"fixed_number": 1}, **fields))


def _runners(factories):
    """Runners in this process; ``factories`` maps a name to ``case -> (run, warmup or None)``."""
    return [LocalRunner(name, factory) for name, factory in factories.items()]


def _recording(log, name, first_call_sleep=0.0):
    """A factory whose operation logs its implementation's name; the first call may sleep."""
    def factory(case):
        calls = []

        def run():
            if not calls and first_call_sleep:
                time.sleep(first_call_sleep)
            calls.append(1)
            log.append(name)
        return run, None
    return factory


def test_samples_are_interleaved_with_rotating_order():
    log = []
    runners = _runners({"a": _recording(log, "a"), "b": _recording(log, "b")})
    results = measure(_fake_case(), runners, Settings(repeat=4, min_repeat=4, max_time=0))
    assert log[:2] == ["a", "b"]  # the first calls
    assert log[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(m.samples_s) for m in results] == [4, 4]


def test_first_call_is_reported_apart_from_the_samples():
    (m,) = measure(_fake_case(), _runners({"a": _recording([], "a", first_call_sleep=0.05)}),
                   Settings(repeat=3, min_repeat=3, max_time=0))
    assert m.first_call_s >= 0.05
    assert len(m.samples_s) == 3 and max(m.samples_s) < 0.05


def test_slow_implementations_stop_at_min_repeat():
    factories = {"slow": lambda case: (lambda: time.sleep(0.02), None), "fast": lambda case: (lambda: None, None)}
    slow, fast = measure(_fake_case(), _runners(factories), Settings(repeat=6, min_repeat=2, max_time=0.03))
    assert len(slow.samples_s) == 2
    assert len(fast.samples_s) == 6
    # a benchmark may lower the minimum further (inference does) ...
    slow, fast = measure(_fake_case(min_repeat=1), _runners(factories),
                         Settings(repeat=6, min_repeat=2, max_time=0.01))
    assert len(slow.samples_s) == 1
    assert len(fast.samples_s) == 6
    # ... or ask for more samples than the settings (the train step does)
    slow, fast = measure(_fake_case(repeat=8), _runners(factories), Settings(repeat=6, min_repeat=2, max_time=0.03))
    assert len(slow.samples_s) == 2
    assert len(fast.samples_s) == 8


def test_a_failing_implementation_is_reported_and_the_others_measured():
    def broken(case):
        def run():
            raise RuntimeError("kernel exploded")
        return run, None
    released = []

    class Fine(LocalRunner):
        def release(self):
            released.append(self.name)
    runners = [LocalRunner("broken", broken), Fine("fine", lambda case: (lambda: None, None))]
    broken_m, fine_m = measure(_fake_case(), runners, Settings(repeat=3, min_repeat=3))
    assert broken_m.error == "RuntimeError: kernel exploded" and broken_m.samples_s == []
    assert fine_m.error is None and len(fine_m.samples_s) == 3
    assert released == ["fine"]  # every runner lets go of its operation after the benchmark


# --- the report ------------------------------------------------------------------

@pytest.mark.slow  # every backend's workers, numba's compiling its kernels
def test_smoke_report(tmp_path, capsys):
    path = tmp_path / "report.json"
    md = tmp_path / "report.md"
    only = ["conv_forward/conv1", "conv_backward/conv1", "maxpool_backward/pool3", "relu_*/relu7",
            "affine_backward/affine2", "train_step/*"]
    argv = ["--smoke", "--json", str(path), "--markdown", str(md), "--quiet"]
    assert report.main(argv + [arg for pattern in only for arg in ("--only", pattern)]) == 0
    data = json.loads(path.read_text())
    impls = data["settings"]["impls"]
    assert set(fastconv.available_backends()) <= set(impls)
    assert ("torch" in impls) == data["settings"]["torch"]
    got = {(r["id"], r["dtype"], r["impl"]) for r in data["results"]}
    ids = {"conv_forward/conv1", "conv_backward/conv1", "maxpool_backward/pool3", "relu_forward/relu7",
           "relu_backward/relu7", "affine_backward/affine2", "train_step/network"}
    variants = {"cython-im2col"} & set(impls)  # measured on the convolutions and the train step only
    assert got == {(i, d, impl) for i in ids for d in ("float32", "float64") for impl in impls
                   if impl not in variants or i.split("/")[0] in ("conv_forward", "conv_backward", "train_step")}
    for r in data["results"]:
        assert r["samples_s"] and all(s > 0 for s in r["samples_s"]) and r["first_call_s"] > 0
        assert r["median_s"] == pytest.approx(np.median(r["samples_s"]))
        assert r["speedup_vs_reference"] is not None
    conv = next(r for r in data["results"] if r["id"] == "conv_backward/conv1")
    assert conv["flops"] == 2 * 22_579_200
    assert conv["gflops"] == pytest.approx(conv["flops"] / conv["median_s"] / 1e9)
    for key in ("cpu_model", "logical_cpus", "cpus_available", "fastconv_threads"):
        assert key in data["machine"]  # what compare needs to tell machines apart
    assert set(data["fastconv"]["info"]["backends"]) >= set(fastconv.available_backends())
    assert set(data["gemm_peak"]) == {"float32", "float64"}
    # every implementation measured in a process of its own, none of them this one
    pids = [facts["pid"] for facts in data["workers"].values()]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    if data["settings"]["torch"]:
        assert data["workers"]["torch"]["fastconv_imported"] is False
        for dtype in ("float32", "float64"):
            check = data["yardstick"][dtype]
            assert check["alone_samples_s"] and check["benchmark_median_s"] > 0
            assert check["benchmark_vs_alone"] == pytest.approx(check["benchmark_median_s"] / check["alone_median_s"])
    text = md.read_text()
    assert text == capsys.readouterr().out
    assert "### Kernels, float32" in text and "| conv_backward | conv1 |" in text
    assert "### Convolutions per layer, float64" in text
    if "cython-im2col" in impls:  # the direct kernels beside the im2col path they replace
        assert "| cython-im2col / cython |" in text and "convolutions faster than cython-im2col" in text


def test_inference_is_scaled_to_10k_images(tmp_path):
    path = tmp_path / "report.json"
    argv = ["--smoke", "--images", "200", "--only", "inference/*", "--backends", "reference", "--no-torch",
            "--dtypes", "float32", "--json", str(path), "--quiet"]
    assert report.main(argv) == 0
    (r,) = json.loads(path.read_text())["results"]
    assert r["scale"] == 50
    assert r["median_s"] == pytest.approx(50 * r["samples_s"][0])


def test_unavailable_backend_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        report.main(["--smoke", "--backends", "no-such-backend"])
    assert exc.value.code == 2


# --- compare -----------------------------------------------------------------------

def _report(cpu, timings):
    """A minimal report: ``timings`` maps impl -> median seconds of one benchmark."""
    results = [{"id": "conv_forward/conv1", "dtype": "float64", "impl": impl,
                "impl_kind": "torch" if impl == "torch" else "backend", "median_s": t, "min_s": t}
               for impl, t in timings.items()]
    machine = {"cpu_model": cpu, "logical_cpus": 2, "cpus_available": 2, "fastconv_threads": 2}
    return {"schema": report.SCHEMA, "created": "now", "command": "python -m bench", "machine": machine,
            "results": results}


def _run_compare(tmp_path, old, new, *args):
    paths = []
    for name, data in (("old.json", old), ("new.json", new)):
        paths.append(str(tmp_path / name))
        Path(paths[-1]).write_text(json.dumps(data))
    return compare.main(paths + list(args))


def test_compare_identical_reports_passes(tmp_path, capsys):
    old = _report("cpu A", {"reference": 0.010, "fast": 0.002, "torch": 0.001})
    assert _run_compare(tmp_path, old, copy.deepcopy(old)) == 0
    assert "OK: no benchmark" in capsys.readouterr().out


def test_compare_fails_loudly_on_a_slower_backend(tmp_path, capsys):
    old = _report("cpu A", {"reference": 0.010, "fast": 0.002})
    new = _report("cpu A", {"reference": 0.010, "fast": 0.003})  # 1.5x slower
    assert _run_compare(tmp_path, old, new, "--factor", "1.2") == 1
    out = capsys.readouterr().out
    assert "PERFORMANCE REGRESSION: 1 of 2" in out
    assert "conv_forward/conv1 float64 fast" in out and "1.50x" in out
    assert _run_compare(tmp_path, old, new, "--factor", "1.6") == 0


def test_compare_relative_to_reference_across_machines(tmp_path, capsys):
    old = _report("cpu A", {"reference": 0.010, "fast": 0.002})
    # a machine twice as fast: both halve, nothing regressed although every absolute time changed
    faster_machine = _report("cpu B", {"reference": 0.005, "fast": 0.001})
    assert _run_compare(tmp_path, old, faster_machine) == 0
    # the fast backend lost ground against the reference: (1.5/5) / (2/10) = 1.5 relative
    regressed = _report("cpu B", {"reference": 0.005, "fast": 0.0015})
    assert _run_compare(tmp_path, old, regressed) == 1
    out = capsys.readouterr().out
    assert "different machines" in out and "SLOWER (relative)" in out
    rows, judge, _, _ = compare.compare(old, regressed, 1.2)
    assert judge == "relative"
    fast = next(r for r in rows if r.key[2] == "fast")
    assert fast.relative == pytest.approx(1.5) and fast.absolute == pytest.approx(0.75)


def test_compare_fails_when_a_benchmark_failed(tmp_path, capsys):
    old = _report("cpu A", {"reference": 0.010, "fast": 0.002})
    new = _report("cpu A", {"reference": 0.010, "fast": 0.002})
    new["results"][1] = {k: v for k, v in new["results"][1].items() if not k.endswith("_s")}
    new["results"][1]["error"] = "RuntimeError: kernel exploded"
    assert _run_compare(tmp_path, old, new) == 1
    assert "FAILED" in capsys.readouterr().out


def test_compare_never_judges_the_torch_yardstick(tmp_path):
    old = _report("cpu A", {"reference": 0.010, "torch": 0.001})
    new = _report("cpu A", {"reference": 0.010, "torch": 0.005})
    assert _run_compare(tmp_path, old, new) == 0


def test_compare_rejects_a_file_that_is_not_a_report(tmp_path):
    old = _report("cpu A", {"reference": 0.010})
    assert _run_compare(tmp_path, old, {"results": []}) == 2


# --- the PyTorch yardstick computes what fastconv computes ---------------------------

# output sizes by hand: (7 + 2 - 3) // 2 + 1 = 4, (6 + 2 - 3) // 2 + 1 = 3; pooling 6x8 by 2 -> 3x4
SMALL_CONV = net.ConvShape("small", (2, 3, 7, 6), (4, 3, 3, 3), 2, 1, (4, 3))
SMALL_POOL = net.PoolShape("small", (2, 3, 6, 8), 2, 2, 2, 0, (3, 4))
SMALL_RELU = net.ReluShape("small", (2, 3, 5, 4))
SMALL_AFFINE = net.AffineShape("small", (5, 2, 3, 2), (12, 7))
SMALL = {"im2col": SMALL_CONV, "col2im": SMALL_CONV, "conv_forward": SMALL_CONV, "conv_backward": SMALL_CONV,
         "maxpool_forward": SMALL_POOL, "maxpool_backward": SMALL_POOL, "relu_forward": SMALL_RELU,
         "relu_backward": SMALL_RELU, "affine_forward": SMALL_AFFINE, "affine_backward": SMALL_AFFINE}


def _as_list(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


@pytest.mark.parametrize("kernel", sorted(SMALL))
def test_torch_yardstick_matches_reference(kernel, dtype):
    pytest.importorskip("torch", reason="PyTorch is an optional extra (pip install fastconv[torch])")
    from bench import torch_ops
    torch_ops.load_torch()
    with fastconv.use_backend("reference"):
        expected = _as_list(net.KERNEL_OPS[kernel](SMALL[kernel], dtype)())
    actual = [t.numpy() for t in _as_list(torch_ops.KERNEL_OPS[kernel](SMALL[kernel], dtype)())]
    if kernel == "maxpool_forward":
        actual = actual[:1]  # torch also returns the argmax indices, kept for the backward pass
    if kernel == "affine_backward":
        actual = actual[:1]  # the layer returns dx and keeps dW, db
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if e.dtype == bool:
            np.testing.assert_array_equal(a, e)
        else:
            assert_close_to_reference(a.reshape(e.shape), e, dtype)


def test_torch_network_has_the_books_parameters():
    pytest.importorskip("torch", reason="PyTorch is an optional extra (pip install fastconv[torch])")
    from bench import torch_ops
    torch_ops.load_torch()
    ours = net._seeded_network(np.float64)
    model = torch_ops.deep_conv_net(net.network_shapes(), ours.params)
    x, _ = net.image_batch(4, np.float64)
    with fastconv.use_backend("reference"):
        expected = ours.predict(x, train_flg=False) / 0.25  # the book scales by (1 - 0.5) at each Dropout
    import torch
    with torch.no_grad():
        actual = model.eval()(torch.from_numpy(x)).numpy()
    assert math.isclose(float(np.max(np.abs(actual - expected))), 0.0, abs_tol=1e-10 * np.max(np.abs(expected)))


def test_each_sample_follows_untimed_settling_calls_of_the_same_implementation():
    log = []
    runners = _runners({"a": _recording(log, "a"), "b": _recording(log, "b")})
    measure(_fake_case(), runners, Settings(repeat=2, min_repeat=2, max_time=0, settle_time=1e-9))
    # first calls, then per round: settle + sample for each, the order rotated
    assert log == ["a", "b", "a", "a", "b", "b", "b", "b", "a", "a"]


def test_settling_uses_the_cheap_warmup_call_when_a_benchmark_has_one():
    log = []
    runners = _runners({"a": lambda case: ((lambda: log.append("run")), (lambda: log.append("warmup")))})
    measure(_fake_case(), runners, Settings(repeat=2, min_repeat=2, max_time=0, settle_time=1e-9))
    assert log == ["warmup", "warmup", "run", "warmup", "run"]


# --- worker processes ------------------------------------------------------------------

def test_the_report_process_imports_neither_fastconv_nor_torch():
    code = "import sys, bench.report, bench.compare; print(sorted({'fastconv', 'torch'} & set(sys.modules)))"
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    assert done.stdout.strip() == "[]"


def test_a_worker_that_cannot_start_reports_why(tmp_path):
    runner = ProcessRunner({"kind": "backend", "name": "nothing", "backend": "no-such-backend"}, dict(os.environ))
    try:
        with pytest.raises(RemoteError, match="no-such-backend"):
            runner.describe()
    finally:
        runner.close()


def test_a_worker_measures_a_case_in_its_own_process():
    runner = ProcessRunner({"kind": "backend", "name": "reference", "backend": "reference"}, dict(os.environ))
    shape = net.network_shapes().conv[0]
    case = Case("relu_forward", "relu1", "", "float32", shape=_shapes.to_dict(net.ReluShape("relu1", (2, 3, 4, 4))))
    try:
        facts = runner.describe()
        assert facts["pid"] != os.getpid() and facts["backend"] == "reference"
        (m,) = measure(case, [runner], Settings(repeat=2, min_repeat=2, max_time=0))
        assert m.error is None and len(m.samples_s) == 2
        bad = Case("conv_forward", "conv1", "", "float16", shape=_shapes.to_dict(shape))
        (m,) = measure(bad, [runner], Settings(repeat=2, min_repeat=2, max_time=0))
        assert m.error and not m.samples_s  # the worker reports the failure and carries on
        (m,) = measure(case, [runner], Settings(repeat=1, min_repeat=1, max_time=0))
        assert m.error is None
    finally:
        runner.close()


def test_a_worker_imports_fastconv_from_the_source_tree_it_is_given(tmp_path):
    # a stand-in for another checkout: just enough of fastconv for a worker to describe it
    package = tmp_path / "fastconv"
    package.mkdir()
    (package / "__init__.py").write_text(
        "__version__ = 'other tree'\n"
        "def set_backend(name): pass\n"
        "def get_backend(): return 'cython'\n"
        "def get_num_threads(): return 1\n")
    spec = {"kind": "backend", "name": "cython@other", "backend": "cython", "source": str(tmp_path)}
    runner = ProcessRunner(spec, dict(os.environ))
    try:
        facts = runner.describe()
    finally:
        runner.close()
    assert Path(facts["fastconv_file"]) == package / "__init__.py"
    assert facts["versions"]["fastconv"] == "other tree"


def test_a_worker_that_hangs_is_stopped_and_reported(tmp_path, monkeypatch):
    from bench import procs
    monkeypatch.setattr(procs, "ANSWER_TIMEOUT_S", 0.5)
    (tmp_path / "fastconv").mkdir()
    (tmp_path / "fastconv" / "__init__.py").write_text("import time\ntime.sleep(60)\n")
    runner = ProcessRunner({"kind": "backend", "name": "stuck", "backend": "cython", "source": str(tmp_path)},
                           dict(os.environ))
    try:
        with pytest.raises(RemoteError, match="no answer"):
            runner.describe()
        assert not runner.worker.alive
    finally:
        runner.close()


# --- the FMA peak -----------------------------------------------------------------------

def test_fma_micro_kernel_computes_its_recurrence(tmp_path):
    try:
        library, _ = peak.build(tmp_path)
    except RuntimeError as exc:
        pytest.skip(f"no working C compiler: {exc}")
    lanes = library.vector_bytes() // 8
    for iterations in (0, 1, 5):
        expected = 0.0
        for chain in range(library.chains()):
            a = 1.0 + chain
            for _ in range(iterations):
                a = a * 0.5 + 0.25
            expected += lanes * a
        assert library.fma_float64(iterations, 1.0, 0.5, 0.25) == pytest.approx(expected, rel=1e-12)


def test_peak_rate_takes_the_thread_count_used_and_the_best_run():
    def run(gflops):
        return {"float32": {"1": {"gflops": gflops}, "2": {"gflops": 2 * gflops}}}
    best = peak.merge(run(100.0), run(110.0))
    assert peak.rate(best, "float32", 1) == 110.0
    assert peak.rate(best, "float32", 2) == 220.0
    assert peak.rate(best, "float32", 8) == 220.0  # more threads than measured: the largest count measured
    assert peak.rate({"error": "no compiler"}, "float32", 2) is None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads a process's CPU time from /proc (Linux)")
def test_a_sample_waits_until_the_worker_measured_before_has_gone_quiet(tmp_path):
    done = tmp_path / "done"
    spinner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        end = time.perf_counter() + 0.6
        while time.perf_counter() < end:
            pass
        open({str(done)!r}, "w").close()
        time.sleep(60)
        """)])
    try:
        time.sleep(0.2)  # started and spinning
        wait_until_idle(spinner.pid)
        assert done.exists()  # not before the spinning stopped
        start = time.perf_counter()
        wait_until_idle(spinner.pid)
        assert time.perf_counter() - start < 1.0  # a quiet process is not waited for
    finally:
        spinner.kill()
        spinner.wait()


def test_the_layer_by_layer_step_computes_what_the_model_does(capsys):
    """bench.layers times the book's loop over the layers against DeepConvNet: the same gradients."""
    from bench import layers as bench_layers
    from fastconv.models import DeepConvNet

    np.random.seed(1)
    x = np.random.rand(4, 1, 28, 28)
    t = np.array([3, 1, 4, 1])
    net = DeepConvNet()
    np.random.seed(2)
    by_layers = {key: value.copy() for key, value in bench_layers.layer_by_layer_gradient(net, x, t).items()}
    np.random.seed(2)
    for key, value in net.gradient(x, t).items():
        np.testing.assert_array_equal(value, by_layers[key])
    assert bench_layers.main(["--steps", "1"]) == 0
    assert "layer by layer / DeepConvNet" in capsys.readouterr().out


def test_the_network_benchmarks_settle_longer_than_the_kernels():
    from bench import cases as bench_cases
    cases = bench_cases.build_cases(net.network_shapes(), ["float32"], 100, network_settle_time=0.7)
    settings = Settings(repeat=2, min_repeat=2, max_time=0, settle_time=0.1)
    network = [c for c in cases if c.layer == bench_cases.NETWORK]
    assert {c.kernel for c in network} == {bench_cases.TRAIN_STEP, bench_cases.INFERENCE}
    assert all(settings.for_case(c).settle_time == 0.7 for c in network)
    assert all(settings.for_case(c).settle_time == 0.1 for c in cases if c.layer != bench_cases.NETWORK)
