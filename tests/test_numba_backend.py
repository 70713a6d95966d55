"""The numba backend's own machinery, against the reference backend.

Each jitted kernel on its own (odd geometries, partial image ranges, buffers
pre-filled with NaN so that a cell left unwritten shows), the batch cut into
image groups and threads, reused workspaces, NaN and -inf semantics, the
disk cache of compiled kernels (including a read-only install), and a clean
ImportError when numba cannot be loaded.

Runs as well with ``NUMBA_DISABLE_JIT=1`` (plain Python kernels), which is how
the kernels' coverage is measured.
"""
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastconv
from fastconv import _plan, _threads, kernels
from fastconv.backends import reference

from conftest import assert_close_to_reference

nb = pytest.importorskip("fastconv.backends.numba", reason="numba backend unavailable (is numba installed?)")
k = nb._k

# (N, C, H, W, fh, fw, stride, pad): same-size, strided, non-square, large pad, 1x1, window = image,
# windows larger than the image (mostly padding)
GEOMETRIES = [
    (3, 2, 5, 5, 3, 3, 1, 1),
    (2, 3, 6, 5, 5, 5, 1, 2),
    (3, 2, 7, 6, 3, 3, 2, 1),
    (2, 1, 5, 7, 2, 3, 3, 0),
    (2, 2, 4, 4, 2, 2, 1, 3),
    (2, 3, 3, 4, 1, 1, 1, 0),
    (3, 1, 4, 5, 4, 5, 1, 0),
    (2, 2, 5, 4, 3, 2, 2, 2),
    (3, 2, 1, 2, 5, 5, 1, 2),
    (2, 1, 1, 1, 7, 7, 1, 3),
    (2, 2, 2, 1, 7, 7, 2, 3),
]
IDS = ["N{}C{}_{}x{}_f{}x{}_s{}p{}".format(*g) for g in GEOMETRIES]


def out_size(size, window, stride, pad):
    return (size + 2 * pad - window) // stride + 1


@pytest.fixture
def numba_backend():
    with fastconv.use_backend("numba"):
        yield


def env_without_fastconv(**extra):
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("FASTCONV_", "NUMBA_")) and key != "PYTHONPATH"}
    env.update(extra)
    return env


def run_python(code, cwd=os.path.dirname(__file__), timeout=600, **env):
    # by default from the tests' folder: the repository root would put the unbuilt source tree first
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=env_without_fastconv(**env), cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_book_layout_im2col_and_col2im(geometry, dtype, rng, numba_backend):
    N, C, H, W, fh, fw, stride, pad = geometry
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    col = kernels.im2col(x, fh, fw, stride, pad)
    np.testing.assert_array_equal(col, reference.im2col(x, fh, fw, stride, pad))
    dcol = rng.standard_normal(col.shape).astype(dtype)
    assert_close_to_reference(kernels.col2im(dcol, x.shape, fh, fw, stride, pad),
                              reference.col2im(dcol, x.shape, fh, fw, stride, pad))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_book_layout_kernels_on_an_image_range(geometry, dtype, rng):
    """The kernels on images [1, N) only: image 0 belongs to another thread's range."""
    N, C, H, W, fh, fw, stride, pad = geometry
    unfold, fold = k.im2col_lines, k.col2im_lines
    out_h, out_w = out_size(H, fh, stride, pad), out_size(W, fw, stride, pad)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    expected = reference.im2col(x, fh, fw, stride, pad)
    first_row = expected.shape[0] // N
    col = np.full(expected.shape, np.nan, dtype=dtype)
    unfold(x, fh, fw, stride, pad, out_h, out_w, col, 1, N)
    np.testing.assert_array_equal(col[first_row:], expected[first_row:])
    assert np.isnan(col[:first_row]).all()  # image 0 belongs to another range
    dcol = rng.standard_normal(expected.shape).astype(dtype)
    dx = np.full(x.shape, 7.0, dtype=dtype)
    fold(dcol, fh, fw, stride, pad, out_h, out_w, dx, 1, N)
    assert_close_to_reference(dx[1:], reference.col2im(dcol[first_row:], (N - 1, C, H, W), fh, fw, stride, pad))
    assert (dx[:1] == 7.0).all()


# --------------------------------------------------------------------------- convolution

def any_work_earns_a_thread(monkeypatch):
    """``fastconv._threads.threads_for`` gives a thread to every task, however little its work."""
    monkeypatch.setattr(_threads, "LEAST_WORK", dict.fromkeys(_threads.LEAST_WORK, 1))


@pytest.fixture
def many_small_pieces(monkeypatch):
    """Two image groups in backward, work split across three threads even for tiny inputs."""
    monkeypatch.setattr(_plan, "DW_GROUPS", 2)
    _plan._conv_plan.cache_clear()  # plans are remembered
    any_work_earns_a_thread(monkeypatch)
    monkeypatch.setenv("FASTCONV_NUM_THREADS", "3")
    yield
    _plan._conv_plan.cache_clear()


def conv_case(geometry, dtype, rng, n_filters=3):
    N, C, H, W, fh, fw, stride, pad = geometry
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    Wt = rng.standard_normal((n_filters, C, fh, fw)).astype(dtype)
    b = rng.standard_normal(n_filters).astype(dtype)
    dout = rng.standard_normal((N, n_filters, out_size(H, fh, stride, pad), out_size(W, fw, stride, pad)))
    return x, Wt, b, dout.astype(dtype), stride, pad


def assert_conv_matches_reference(x, Wt, b, dout, stride, pad):
    out, cache = kernels.conv_forward(x, Wt, b, stride, pad)
    expected_out, expected_cache = reference.conv_forward(x, Wt, b, stride, pad, None)
    assert_close_to_reference(out, expected_out)
    for got, expected in zip(kernels.conv_backward(dout, cache, Wt),
                             reference.conv_backward(dout, expected_cache, Wt)):
        assert_close_to_reference(got, expected)
    return cache


def direct_in_the_slow_set(geometries):
    """The geometries as params, those of the direct kernels but the first in the slow set: each compiles
    them anew, and ``test_direct_kernels.py`` tests them in the default set on the network's geometries."""
    return [pytest.param(g, id=i, marks=[pytest.mark.slow] if n and g[6] == 1 and g[7] < min(g[4:6]) else [])
            for n, (g, i) in enumerate(zip(GEOMETRIES, IDS))]


@pytest.mark.parametrize("geometry", direct_in_the_slow_set(GEOMETRIES))
def test_convolution_in_one_piece(geometry, dtype, rng, numba_backend):
    assert_conv_matches_reference(*conv_case(geometry, dtype, rng))


@pytest.mark.parametrize("geometry", direct_in_the_slow_set(GEOMETRIES))
def test_convolution_cut_into_groups_and_threads(geometry, dtype, rng, numba_backend, many_small_pieces):
    x, Wt, b, dout, stride, pad = conv_case(geometry, dtype, rng)
    x, dout = np.concatenate([x] * 3), np.concatenate([dout] * 3)  # several images per group
    cache = assert_conv_matches_reference(x, Wt, b, dout, stride, pad)
    assert cache.plan.direct == (stride == 1 and pad < min(geometry[4:6]))
    assert not cache.plan.direct or cache.plan.groups == 2


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[2]], ids=["direct", "unfolded"])
def test_convolution_exposes_the_books_col_and_col_W(geometry, rng, numba_backend):
    x, Wt, b, _, stride, pad = conv_case(geometry, np.float64, rng)
    _, cache = kernels.conv_forward(x, Wt, b, stride, pad)
    expected = reference.im2col(x, 3, 3, stride, pad)
    x[...] = np.nan  # the caller's array may change after forward
    np.testing.assert_array_equal(cache.col, expected)
    np.testing.assert_array_equal(cache.col_W, Wt.reshape(3, -1).T)
    assert cache.col is cache.col  # made once


def test_a_task_no_thread_has_started_is_cancelled_when_the_caller_is_done():
    """Work is not held up by a busy or sleeping thread: its task is dropped once the others drained the work."""
    from fastconv.backends import _numba_pool
    ran = []
    call = _numba_pool._Call([lambda: ran.append("late")])
    call.wait()  # no thread has taken the task: returns at once
    assert not call.start(0)  # the thread that takes it now finds it cancelled
    assert ran == [] and call.cancelled == [True]


def test_pool_runs_every_task_of_every_call_once():
    pool = nb._pool.Pool("test-pool")
    for threads in (2, 3, 2):
        counter = iter(range(1000))
        seen = []

        def drain():
            for item in counter:  # next() on it is atomic (GIL)
                seen.append(item)
        pool.run([drain] * threads)
        assert sorted(seen) == list(range(1000))


def test_a_call_while_the_pool_is_busy_runs_on_its_own_thread():
    import threading
    pool = nb._pool.Pool("test-pool")
    inside, release = threading.Event(), threading.Event()
    other = threading.Thread(target=pool.run, args=([lambda: (inside.set(), release.wait()), lambda: None],))
    other.start()
    try:
        assert inside.wait(10)
        threads = []
        pool.run([lambda: threads.append(threading.get_ident())] * 3)  # the pool is held by the other call
        assert threads == [threading.get_ident()] * 3
    finally:
        release.set()
        other.join()


def test_errors_of_any_task_are_raised():
    def fail():
        raise ValueError("from a pool thread")
    with pytest.raises(ValueError, match="from a pool thread"):
        nb._pool.Pool("test-pool").run([lambda: __import__("time").sleep(0.2), fail])


def test_pool_threads_go_to_sleep_soon_after_a_call():
    import time
    pool = nb._pool.Pool("test-pool")
    pool.run([lambda: None] * 3)
    time.sleep(0.1)  # polling lasts well under a millisecond
    start = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - start < 0.05  # nobody spins


def test_polling_sees_a_store_from_another_thread_and_gives_up_when_none_comes():
    import threading
    import time
    from fastconv.backends._numba_pool import spin_until
    word = np.zeros(1, dtype=np.int64)
    assert not spin_until(word, 1, 1000)  # nothing stored: gives up
    if nb.numba.config.DISABLE_JIT:
        return  # the uncompiled stand-in does not poll
    setter = threading.Timer(0.001, lambda: word.__setitem__(0, 1))
    setter.start()
    start = time.perf_counter()
    while not spin_until(word, 1, 1 << 40):  # polls (for minutes at most) until the store arrives
        pass
    setter.join()
    assert word[0] == 1 and time.perf_counter() - start < 60


def test_blas_is_single_threaded_inside_and_restored_after_overlapping_uses():
    from threadpoolctl import threadpool_info

    from fastconv.backends._blas import SingleThreadedBlas

    def blas_threads():
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    limiter = SingleThreadedBlas()
    with limiter:
        with limiter:  # a second user thread entering while the first is inside
            assert set(blas_threads()) <= {1}
        assert set(blas_threads()) <= {1}  # still inside the first
    assert blas_threads() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_working_threads(rng, numba_backend, two_threads):
    x, Wt, b, _, stride, pad = conv_case((6, 2, 5, 5, 3, 3, 1, 1), np.float64, rng)
    expected, _ = kernels.conv_forward(x, Wt, b, stride, pad)  # the parent's pool is started
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the same call must finish, on threads of its own
        try:
            out, _ = kernels.conv_forward(x, Wt, b, stride, pad)
            os.write(write, b"ok" if np.array_equal(out, expected) else b"wrong")
        finally:
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60)
    answer = os.read(read, 16) if ready else b"no answer: the child hangs"
    os.close(read)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert answer == b"ok"


def test_results_do_not_depend_on_the_thread_count(rng, numba_backend, monkeypatch):
    any_work_earns_a_thread(monkeypatch)
    x, Wt, b, dout, stride, pad = conv_case((9, 2, 6, 6, 3, 3, 1, 1), np.float32, rng, n_filters=4)
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("FASTCONV_NUM_THREADS", threads)
        out, cache = kernels.conv_forward(x, Wt, b, stride, pad)
        pooled, pool_cache = kernels.maxpool_forward(out, 3, 3, 1, 1)  # overlapping windows
        relu, mask = kernels.relu_forward(out)
        results.append([out, *kernels.conv_backward(dout, cache, Wt), pooled,
                        kernels.maxpool_backward(np.ones_like(pooled), pool_cache), relu, mask,
                        kernels.col2im(cache.col, x.shape, 3, 3, stride, pad)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setenv("FASTCONV_NUM_THREADS", "2")
    any_work_earns_a_thread(monkeypatch)


def test_workspace_is_reused_and_outputs_are_never_overwritten(rng, numba_backend, two_threads):
    x, Wt, b, dout, stride, pad = conv_case((6, 2, 5, 5, 3, 3, 1, 1), np.float64, rng)
    out1, cache1 = kernels.conv_forward(x, Wt, b, stride, pad)
    dx1, dW1, db1 = kernels.conv_backward(dout, cache1, Wt)
    kept = [a.copy() for a in (out1, dx1, dW1, db1)]
    packed, forward_buffers = cache1.packed, [id(a) for a in cache1.scratch["forward"]]
    out2, cache2 = kernels.conv_forward(2 * x, Wt, b, stride, pad, workspace=cache1)
    dx2, _, _ = kernels.conv_backward(dout, cache2, Wt)
    assert cache2.packed is packed and len(cache2.scratch["forward"]) == 2
    assert [id(a) for a in cache2.scratch["forward"]] == forward_buffers
    assert out2 is not out1 and dx2 is not dx1
    for a, b_ in zip((out1, dx1, dW1, db1), kept):
        np.testing.assert_array_equal(a, b_)

    pooled, pool_cache = kernels.maxpool_forward(x, 2, 2, 2, 0)
    _, pool_cache2 = kernels.maxpool_forward(x + 1, 2, 2, 2, 0, workspace=pool_cache)
    assert pool_cache2.source is pool_cache.source


@pytest.mark.parametrize("change", ["batch", "dtype", "geometry", "threads"])
def test_workspace_of_another_shape_is_not_misused(change, rng, numba_backend, two_threads, monkeypatch):
    x, Wt, b, dout, stride, pad = conv_case((4, 2, 6, 6, 3, 3, 1, 1), np.float64, rng)
    _, workspace = kernels.conv_forward(x, Wt, b, stride, pad)
    _, pool_workspace = kernels.maxpool_forward(x, 2, 2, 2, 0)
    if change == "batch":
        x, dout = x[:3], dout[:3]
    elif change == "dtype":
        x, Wt, b, dout = (a.astype(np.float32) for a in (x, Wt, b, dout))
    elif change == "geometry":
        pad, dout = 0, dout[:, :, 1:-1, 1:-1]
    else:
        monkeypatch.setenv("FASTCONV_NUM_THREADS", "3")
    out, cache = kernels.conv_forward(x, Wt, b, stride, pad, workspace=workspace)
    expected_out, expected_cache = reference.conv_forward(x, Wt, b, stride, pad, None)
    assert_close_to_reference(out, expected_out)
    for got, expected in zip(kernels.conv_backward(dout, cache, Wt), reference.conv_backward(dout, expected_cache, Wt)):
        assert_close_to_reference(got, expected)
    pooled, _ = kernels.maxpool_forward(out, 2, 2, 2, 0, workspace=pool_workspace)
    assert_close_to_reference(pooled, reference.maxpool_forward(out, 2, 2, 2, 0, None)[0])


def test_an_empty_batch_gives_empty_results(numba_backend):
    x = np.zeros((0, 2, 5, 5))
    Wt, b = np.ones((3, 2, 3, 3)), np.zeros(3)
    out, cache = kernels.conv_forward(x, Wt, b, 1, 1)
    dx, dW, db = kernels.conv_backward(np.zeros((0, 3, 5, 5)), cache, Wt)
    assert out.shape == (0, 3, 5, 5) and dx.shape == x.shape
    np.testing.assert_array_equal(dW, np.zeros_like(Wt))
    np.testing.assert_array_equal(db, np.zeros(3))
    pooled, pool_cache = kernels.maxpool_forward(x, 2, 2, 2, 0)
    assert pooled.shape == (0, 2, 2, 2) and kernels.maxpool_backward(pooled, pool_cache).shape == x.shape
    assert kernels.im2col(x, 3, 3, 1, 1).shape == (0, 18)
    relu, mask = kernels.relu_forward(x)
    assert relu.shape == mask.shape == x.shape


# --------------------------------------------------------------------------- pooling and ReLU

POOLS = [(2, 2, 2, 0), (3, 3, 1, 1), (2, 3, 2, 1), (3, 2, 3, 0), (1, 1, 1, 0)]


@pytest.mark.parametrize("pool", POOLS, ids=["p{}x{}_s{}p{}".format(*p) for p in POOLS])
def test_maxpool_matches_reference_with_ties_nan_and_infinities(pool, dtype, rng, numba_backend, many_small_pieces):
    ph, pw, stride, pad = pool
    x = rng.integers(-2, 3, (4, 3, 7, 6)).astype(dtype)  # many ties
    x[0, 0, :2, :2] = np.nan
    x[3, 0, 3, 4] = x[3, 1, 5, 5] = np.nan  # inside windows, after their first cell: the NaN wins
    x[1, 1] = -np.inf  # whole planes of -inf: the window's first cell wins, even a padded one
    x[2, 2, 3, 3] = np.inf
    out, cache = kernels.maxpool_forward(x, ph, pw, stride, pad)
    expected, expected_cache = reference.maxpool_forward(x, ph, pw, stride, pad, None)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(cache.arg_max, expected_cache.arg_max)
    dout = rng.standard_normal(out.shape).astype(dtype)
    assert_close_to_reference(kernels.maxpool_backward(dout, cache), reference.maxpool_backward(dout, expected_cache))


def test_relu_semantics_for_signed_zeros_nan_and_infinities(numba_backend, many_small_pieces):
    x = np.array([-0.0, 0.0, np.nan, -np.inf, np.inf, -1e-300, 1e-300, 2.0] * 3)
    out, mask = kernels.relu_forward(x)
    expected, expected_mask = reference.relu_forward(x)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(mask, expected_mask)
    dout = np.arange(x.size, dtype=np.float64)
    dx = kernels.relu_backward(dout, mask)
    assert dx is dout
    np.testing.assert_array_equal(dx, reference.relu_backward(np.arange(x.size, dtype=np.float64), mask))


def test_affine_matches_reference(dtype, rng, numba_backend):
    x = rng.standard_normal((5, 7)).astype(dtype)
    W = rng.standard_normal((7, 3)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    dout = rng.standard_normal((5, 3)).astype(dtype)
    assert_close_to_reference(kernels.affine_forward(x, W, b), reference.affine_forward(x, W, b))
    for got, expected in zip(kernels.affine_backward(dout, x, W), reference.affine_backward(dout, x, W)):
        assert_close_to_reference(got, expected)


# --------------------------------------------------------------------------- loading and compiling

def test_a_forced_variant_plans_the_convolutions_inside_its_block_only():
    shapes = ((2, 3, 6, 6), (4, 3, 3, 3), 1, 1, np.float32)
    host = nb.simd_variant()
    assert host == nb._simd.host_variant()
    assert nb.available_variants() == _plan.VARIANTS  # LLVM splits vectors wider than the CPU's
    for variant in _plan.VARIANTS:
        with nb._force_variant(variant):
            assert nb.simd_variant() == variant and nb._conv_plan(*shapes).variant == variant
        assert nb.simd_variant() == host
    with pytest.raises(ValueError, match="not one of"):
        with nb._force_variant("sse9"):
            pass


def test_pool_polls_as_long_as_the_thread_policy_says():
    assert nb._pool.SPIN_TICKS == _threads.POLL_MICROSECONDS * nb._pool.TICKS_PER_MICROSECOND


def test_import_compiles_nothing():
    result = run_python("""
        import fastconv.backends.numba as backend
        from numba.core.registry import CPUDispatcher
        modules = (backend._k, backend._forward, backend._backward, backend._pool)
        jitted = [f for module in modules for f in vars(module).values() if isinstance(f, CPUDispatcher)]
        print(len(jitted), sum(len(f.signatures) for f in jitted))
    """)
    count, compiled = map(int, result.stdout.split())
    assert count >= 10 and compiled == 0


def test_backend_is_unavailable_with_its_reason_when_numba_cannot_load():
    result = run_python("""
        import sys
        sys.modules["numba"] = None  # any import of numba now fails
        try:
            import fastconv.backends.numba
        except ImportError as exc:
            print("ImportError:", exc)
        import numpy as np
        import fastconv
        from fastconv import kernels
        print("status:", fastconv.backend_status()["numba"])
        with fastconv.use_backend("reference"):
            out, _ = kernels.conv_forward(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), np.zeros(1))
        print("reference:", out.ravel()[0])
    """)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ImportError: the numba backend needs a working numba")
    assert lines[1].startswith("status: ImportError: the numba backend needs a working numba")
    assert lines[2] == "reference: 9.0"


def test_the_import_error_names_numba(monkeypatch):
    """The module itself, run under another name with numba hidden, raises ImportError (not anything else)."""
    import importlib.util
    monkeypatch.setitem(sys.modules, "numba", None)
    spec = importlib.util.spec_from_file_location("numba_backend_without_numba", nb.__file__)
    with pytest.raises(ImportError, match="the numba backend needs a working numba"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_kernel_falls_back_to_no_cache_and_warns_once(monkeypatch):
    compiled = []

    def fake_njit(cache=False, **options):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available")
        return lambda function: compiled.append(function) or function

    monkeypatch.setattr(k, "njit", fake_njit)
    monkeypatch.setattr(k, "_uncached", [])

    def f():
        pass

    with pytest.warns(RuntimeWarning, match="compiled in every process: cannot cache"):
        assert k._kernel(f) is f
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k._kernel(f)
    assert caught == []  # said once
    assert compiled == [f, f] and k._uncached == ["f", "f"]


CACHE_PROBE = """
    import numpy as np
    import fastconv
    from fastconv.backends import _numba_kernels as k
    x = np.linspace(-1, 1, 9)
    out, mask = np.empty_like(x), np.empty(x.shape, dtype=bool)
    k.relu_forward(x, out, mask, 0, x.size)
    assert (out == np.maximum(x, 0)).all() and (mask == (x <= 0)).all()
    stats = k.relu_forward.stats
    print(fastconv.__file__)
    print(stats.cache_path)
    print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()), len(k._uncached))
"""


@pytest.fixture
def read_only_install(tmp_path):
    """A copy of the package whose own directories cannot hold a cache."""
    site = tmp_path / "site"
    package = Path(fastconv.__file__).parent
    shutil.copytree(package, site / "fastconv", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in [site / "fastconv", *(p for p in (site / "fastconv").rglob("*") if p.is_dir())]:
        (folder / "__pycache__").write_text("")  # a file where Numba (as root too) would make the folder
    modes = {p: p.stat().st_mode for p in [site, *site.rglob("*")]}
    for path, mode in modes.items():
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield site
    for path, mode in modes.items():
        path.chmod(mode)


def test_a_read_only_install_caches_compiled_kernels_in_the_user_cache(read_only_install, tmp_path):
    env = {"PYTHONPATH": str(read_only_install), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    # run from tmp_path: the working directory comes first on sys.path
    first = run_python(CACHE_PROBE, cwd=tmp_path, **env).stdout.splitlines()
    second = run_python(CACHE_PROBE, cwd=tmp_path, **env).stdout.splitlines()
    assert first[0].startswith(str(read_only_install))
    assert first[1].startswith(str(tmp_path / "cache" / "numba"))
    assert first[2] == "0 1 0"  # compiled, and saved ...
    assert second[2] == "1 0 0"  # ... then loaded instead of compiled


def test_kernels_work_uncached_when_no_cache_directory_is_writable(read_only_install, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result = run_python(CACHE_PROBE, cwd=tmp_path, PYTHONPATH=str(read_only_install),
                        XDG_CACHE_HOME=str(blocker / "cache"), PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="always")
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(read_only_install))
    assert lines[2].split()[2] != "0"  # every kernel uncached ...
    assert "will be compiled in every process" in result.stderr  # ... and said once
    assert result.stderr.count("will be compiled in every process") == 1


@pytest.mark.slow
def test_compiled_kernels_stay_inside_their_arrays(tmp_path):
    """With Numba's bounds checking on, every kernel runs the awkward geometries without an IndexError."""
    # compiles every kernel cold for three instruction sets, two dtypes and many tile shapes: minutes, hence
    # the longer timeout
    result = run_python(f"""
        import numpy as np
        import fastconv
        from fastconv import kernels
        import fastconv.backends.numba as backend
        geometries = {GEOMETRIES!r}
        rng = np.random.default_rng(0)
        with fastconv.use_backend("numba"):
            for i, (N, C, H, W, fh, fw, stride, pad) in enumerate(geometries):
                for dtype in (np.float32, np.float64):
                    x = rng.standard_normal((N, C, H, W)).astype(dtype)
                    Wt = rng.standard_normal((2, C, fh, fw)).astype(dtype)
                    # every tile shape and width: the variants in turn, each on a third of the geometries
                    for variant in [("avx512", "avx2", "generic")[(i + j) % 3] for j in range(1 + (i < 2))]:
                        with backend._force_variant(variant):
                            out, cache = kernels.conv_forward(x, Wt, np.zeros(2, dtype), stride, pad)
                            kernels.conv_backward(np.ones_like(out), cache, Wt)
                    kernels.col2im(kernels.im2col(x, fh, fw, stride, pad), x.shape, fh, fw, stride, pad)
                    if 2 * pad <= min(fh, fw):
                        pooled, pool_cache = kernels.maxpool_forward(x, fh, fw, stride, pad)
                        kernels.maxpool_backward(pooled, pool_cache)
                    relu, mask = kernels.relu_forward(x)
                    kernels.relu_backward(relu, mask)
        print("ok")
    """, timeout=1800, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    assert result.stdout.strip() == "ok"
