"""Shared fixtures: every kernel and layer test runs on every available backend."""
import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

import fastconv
from fastconv import _build_check, _plan, _registry
from fastconv._checks import output_size

BACKENDS = fastconv.available_backends()
# the backends whose kernels are tested against the reference (never the reference itself)
FAST_BACKENDS = [name for name in BACKENDS if name != "reference"]
MNIST_DIR = Path(os.environ.get("FASTCONV_TEST_MNIST", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"))


def pytest_configure(config):
    # A source tree without its compiled extensions (e.g. `python -m pytest` in an unbuilt clone, which
    # imports the clone instead of the installed package) cannot test the cython backend: stop, saying why.
    problem = _build_check.diagnosis()
    if problem and _build_check.skipped_reason() is None:  # an install without them on purpose runs the rest
        pytest.exit(f"fastconv is not built here.\n{problem}", returncode=pytest.ExitCode.USAGE_ERROR)


# numba compiles its direct kernels anew for each geometry whose tiles differ (several seconds each): in the
# default set it runs the direct kernels on these geometries (N, C, K, H, W, FH, FW, stride, pad) only, the
# chapter-8 network's first layer and a paired layer, besides the network itself; its other direct
# geometries and forced tiles run in the slow set (every test that takes a ``geometry`` or ``tile_kind``)
NUMBA_GEOMETRIES = [(3, 1, 16, 28, 28, 3, 3, 1, 1), (3, 16, 32, 14, 14, 3, 3, 1, 1)]


def _direct_geometry(geometry):
    N, C, K, H, W, FH, FW, stride, pad = geometry
    return stride == 1 and pad < min(FH, FW)


@pytest.hookimpl(tryfirst=True)  # before -m picks the tests to run
def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        backend = params.get("backend", params.get("fast_backend", params.get("name", (params.get("fast") or (None,))[0])))
        if backend != "numba":
            continue
        geometry = params.get("geometry")
        new_geometry = (isinstance(geometry, tuple) and len(geometry) == 9 and _direct_geometry(geometry)
                        and geometry not in NUMBA_GEOMETRIES)
        if new_geometry or params.get("tile_kind") == "pixels":
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    status = fastconv.backend_status()
    return "fastconv backends: " + ", ".join(f"{k}={'ok' if v == 'ok' else 'UNAVAILABLE (' + v + ')'}" for k, v in status.items())


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test with each available backend active; yields its name."""
    with fastconv.use_backend(request.param):
        yield request.param


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    """Run the test with each fast backend active (never the reference, which it is compared with)."""
    with fastconv.use_backend(request.param):
        yield request.param


@pytest.fixture(params=[np.float64, np.float32], ids=["float64", "float32"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(params=["grid", "pixels"])
def tile_kind(request, monkeypatch):
    """The direct kernels' forward tiles forced to one kind: the grid tile, or the tile with the output
    channels in the lanes, its input channels taken a few at a time (the plan otherwise picks per layer;
    plans are forgotten before and after)."""
    other = "PIXEL_TILE_COST" if request.param == "grid" else "TILE_COST"
    monkeypatch.setattr(_plan, other, dict.fromkeys(getattr(_plan, other), 1e9))
    if request.param == "pixels":  # chunks of 1 to 3 input channels for 3x3 filters: partial sums carried over
        monkeypatch.setattr(_plan, "L1_WEIGHT_BYTES", 1200)
    _plan._conv_plan.cache_clear()
    yield request.param
    _plan._conv_plan.cache_clear()


def tolerance(dtype, sums=False):
    """The relative error allowed between a fast backend's result in ``dtype`` and the reference's (run in
    float64 or in ``dtype``): 1e-12 in float64; in float32 1e-5, or 1e-4 for ``sums`` over a whole batch
    (a convolution's dW and db)."""
    if np.dtype(dtype) == np.float64:
        return 1e-12
    return 1e-4 if sums else 1e-5


def assert_close_to_reference(actual, expected, dtype=None, sums=False):
    """Relative max-norm check: max|a - e| <= tolerance(dtype, sums) * max(1, max|e|); ``actual`` has
    ``dtype`` (default: the expected array's) and the expected shape."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    dtype = np.dtype(dtype or expected.dtype)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    rtol = tolerance(dtype, sums)
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    err = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) if expected.size else 0.0
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


@pytest.fixture(scope="session")
def mnist_dir():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST files not found in {MNIST_DIR} (set FASTCONV_TEST_MNIST to a folder with the IDX .gz files)")
    return MNIST_DIR


def assert_subnormals_count_as_zero(dtype, run):
    """``run(x, W, b, dout, pad)`` -> (out, dx, dW, db) equals the reference's results with the subnormal
    numbers of x and dout read as zero; afterwards this thread's NumPy still keeps subnormals."""
    from fastconv.backends import reference

    tiny = np.finfo(dtype).tiny
    x = np.full((2, 3, 5, 5), tiny / 4, dtype=dtype)
    x[0, 0, 2, 2] = 1
    w = np.ones((4, 3, 3, 3), dtype=dtype)
    b = np.zeros(4, dtype=dtype)
    dout = np.full((2, 4, 5, 5), tiny / 4, dtype=dtype)
    dout[1, 3, 0, 0] = 2
    as_zero = [np.where(np.abs(a) < tiny, 0, a) for a in (x, dout)]
    out, cache = reference.conv_forward(as_zero[0], w, b, 1, 1, None)
    expected = (out,) + tuple(reference.conv_backward(as_zero[1], cache, w))
    assert expected[0].sum() == 4 * 9 and expected[1].sum() == 2 * 3 * 4  # the normal values go through
    for got, want in zip(run(x, w, b, dout, 1), expected):
        np.testing.assert_array_equal(got, want)
    one, four = np.ones(1, dtype=dtype), np.full(1, 4, dtype=dtype)
    assert (x[1, 0, 0] * one)[0] > 0 and (np.array([tiny], dtype=dtype) / four)[0] > 0


def geometry_id(geometry):
    """A test id for a convolution geometry (N, C, K, H, W, FH, FW, stride, pad)."""
    return "N{}C{}K{}_{}x{}_f{}x{}_s{}p{}".format(*geometry)


def host_variant(name):
    """The instruction-set variant backend ``name`` runs on this CPU."""
    return _registry.backend_module(name).simd_variant()


@contextlib.contextmanager
def forced_variant(name, variant):
    """Backend ``name`` active, its direct kernels forced to ``variant`` (skips where this CPU lacks it)."""
    module = _registry.backend_module(name)
    if variant not in module.available_variants():
        pytest.skip(f"this CPU does not run the {name} backend's {variant} kernels")
    with fastconv.use_backend(name), module._force_variant(variant):
        yield module


def conv_problem(rng, geometry, dtype):
    """Random x, W, b, dout of a convolution geometry (N, C, K, H, W, FH, FW, stride, pad), with its stride
    and pad: the arguments of a forward and its backward."""
    N, C, K, H, W, FH, FW, stride, pad = geometry
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C, FH, FW)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    out_h, out_w = output_size(H, FH, stride, pad), output_size(W, FW, stride, pad)
    dout = rng.standard_normal((N, K, out_h, out_w)).astype(dtype)
    return x, w, b, stride, pad, dout


def conv_relu_reference(x, w, b, stride, pad, dout):
    """(out, dx, dW, db) of a convolution followed by a ReLU, from the reference's convolution and the
    book's ReLU written out here: out = conv with zeros where conv <= 0, and the convolution's backward
    run on dout with zeros at the same places."""
    from fastconv.backends import reference

    conv, cache = reference.conv_forward(x, w, b, stride, pad, None)
    off = conv <= 0
    return (np.where(off, 0, conv).astype(conv.dtype),) + tuple(
        reference.conv_backward(np.where(off, 0, dout).astype(dout.dtype), cache, w))
