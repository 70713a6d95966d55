"""What is particular to the compiled backend: buffers, threads, the thread pool and BLAS settings.

Kernel results are compared with the reference backend in
``test_kernel_properties.py``; here the backend must also be importable (a
failed build fails these tests rather than skipping them).
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import fastconv
from fastconv import _build_check, _plan, _threads, info, kernels

if _build_check.skipped_reason() is not None:  # installed without its extensions, on purpose or for want of a compiler
    pytest.skip(f"the cython backend is not built: {_build_check.skipped_reason()}", allow_module_level=True)

from fastconv._ext import _direct, _im2col, _parallel, _pool  # noqa: E402
from fastconv.backends import reference  # noqa: E402
from fastconv.layers import Convolution, Pooling  # noqa: E402
from fastconv.models import DeepConvNet  # noqa: E402
from conftest import assert_close_to_reference  # noqa: E402


@pytest.fixture
def cython_backend():
    status = fastconv.backend_status()["cython"]
    assert status == "ok", f"the cython backend does not import: {status}"
    with fastconv.use_backend("cython") as module:
        yield module


def conv_problem(rng, batch, dtype=np.float64, channels=3, size=9, filters=4):
    x = rng.standard_normal((batch, channels, size, size)).astype(dtype)
    W = rng.standard_normal((filters, channels, 3, 3)).astype(dtype)
    b = rng.standard_normal(filters).astype(dtype)
    return x, W, b


def test_cython_is_the_default_only_where_it_is_fully_built(cython_backend, monkeypatch):
    """With its direct kernels, its threads and a vector variant wider than the portable one, cython comes
    first; a serial build (or one of the portable kernels only) leaves the default to numba."""
    monkeypatch.delenv("FASTCONV_BACKEND", raising=False)
    fully_built = cython_backend._THREADED and cython_backend.simd_variant() not in (None, "generic")
    expected = "cython" if fully_built or "numba" not in fastconv.available_backends() else "numba"
    assert fastconv.available_backends()[0] == expected


def test_conv_layer_reuses_its_scratch_and_stays_correct_as_batch_and_dtype_change(cython_backend, rng, monkeypatch):
    monkeypatch.setenv("FASTCONV_NUM_THREADS", "2")  # scratch is per thread: fix its size
    layer = Convolution(None, None, stride=1, pad=1)
    reference_layer = Convolution(None, None, stride=1, pad=1)
    previous_scratch = None
    # (batch, image size, dtype, whether the previous scratch must be taken over)
    for batch, size, dtype, reused in [(4, 9, np.float64, None), (4, 9, np.float64, True), (2, 9, np.float64, True),
                                       (4, 30, np.float64, False), (4, 30, np.float32, False),
                                       (1, 5, np.float32, True)]:
        x, W, b = conv_problem(rng, batch, dtype, size=size)
        layer.W, layer.b, reference_layer.W, reference_layer.b = W, b, W, b
        out = layer.forward(x)
        with fastconv.use_backend("reference"):
            expected_out = reference_layer.forward(x)
        assert_close_to_reference(out, expected_out)
        dout = rng.standard_normal(out.shape).astype(dtype)
        dx = layer.backward(dout)
        with fastconv.use_backend("reference"):
            expected_dx = reference_layer.backward(dout)
        assert_close_to_reference(dx, expected_dx)
        assert_close_to_reference(layer.dW, reference_layer.dW)
        assert_close_to_reference(layer.db, reference_layer.db)
        scratch = layer._cache.scratch
        if reused is not None:
            assert np.shares_memory(scratch, previous_scratch) == reused, (batch, size, dtype)
        previous_scratch = scratch


# (N, C, H, W, fh, fw, stride, pad): same-size, strided, non-square, pad larger than the filter,
# windows larger than the image
CONV_GEOMETRIES = [
    (3, 2, 7, 7, 3, 3, 1, 1),
    (2, 3, 9, 6, 3, 2, 2, 1),
    (3, 1, 8, 9, 2, 3, 3, 0),
    (2, 2, 5, 5, 2, 2, 1, 3),
    (2, 2, 2, 3, 5, 5, 1, 2),
]


@pytest.mark.parametrize("pieces", ["blocks of images", "whole images", "one line", "three lines"])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=lambda g: "N{}C{}_{}x{}_f{}x{}_s{}p{}".format(*g))
def test_convolution_cut_into_blocks_images_or_lines_matches_reference(geometry, pieces, cython_backend, dtype,
                                                                       rng, monkeypatch):
    N, C, H, W, fh, fw, stride, pad = geometry
    with cython_backend.conv_engine("im2col"):
        im2col_pieces_match_reference(geometry, pieces, cython_backend, dtype, rng, monkeypatch)


def im2col_pieces_match_reference(geometry, pieces, cython_backend, dtype, rng, monkeypatch):
    N, C, H, W, fh, fw, stride, pad = geometry
    gemm_columns, tile_bytes = {"blocks of images": (10**6, 0), "whole images": (1, 0),
                                "one line": (1, 1), "three lines": (1, None)}[pieces]
    monkeypatch.setattr(cython_backend, "GEMM_COLUMNS", gemm_columns)
    out_w = (W + 2 * pad - fw) // stride + 1
    line_bytes = C * fh * fw * out_w * np.dtype(dtype).itemsize
    monkeypatch.setattr(cython_backend, "TILE_BYTES", 3 * line_bytes if tile_bytes is None else tile_bytes)
    monkeypatch.setenv("FASTCONV_NUM_THREADS", "2")
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    Wt = rng.standard_normal((4, C, fh, fw)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    out, cache = kernels.conv_forward(x, Wt, b, stride, pad)
    expected_out, expected_cache = reference.conv_forward(x, Wt, b, stride, pad, None)
    assert_close_to_reference(out, expected_out)
    dout = rng.standard_normal(out.shape).astype(dtype)
    for got, expected in zip(kernels.conv_backward(dout, cache, Wt), reference.conv_backward(dout, expected_cache, Wt)):
        assert_close_to_reference(got, expected)


def test_pool_layer_reuses_its_indices_and_stays_correct_as_the_batch_changes(cython_backend, rng):
    layer = Pooling(2, 2, stride=2)
    reference_layer = Pooling(2, 2, stride=2)
    previous = None
    for batch, reused in [(5, None), (3, True), (8, False), (8, True)]:
        x = rng.integers(-3, 4, (batch, 2, 6, 6)).astype(np.float64)
        out = layer.forward(x)
        with fastconv.use_backend("reference"):
            expected = reference_layer.forward(x)
        np.testing.assert_array_equal(out, expected)
        dout = rng.standard_normal(out.shape)
        dx = layer.backward(dout)
        with fastconv.use_backend("reference"):
            np.testing.assert_array_equal(dx, reference_layer.backward(dout))
        if reused is not None:
            assert np.shares_memory(layer._cache.source, previous) == reused
        previous = layer._cache.source


@pytest.mark.parametrize("shape", [(3, 4, 28, 28), (2, 3, 9, 13), (1, 2, 2, 2), (2, 5, 16, 17), (1, 1, 4, 40)])
def test_two_by_two_pooling_with_ties_nan_and_infinities_matches_reference(cython_backend, dtype, shape, rng):
    # the vectorized 2x2 / stride-2 path: ties, NaN (first NaN wins) and -inf, on odd widths too
    x = rng.integers(-2, 3, shape).astype(dtype)
    for value, fraction in ((np.nan, 0.05), (-np.inf, 0.05), (np.inf, 0.02)):
        x[rng.random(shape) < fraction] = value
    out, cache = kernels.maxpool_forward(x, 2, 2, 2, 0)
    expected, expected_cache = reference.maxpool_forward(x, 2, 2, 2, 0, None)
    np.testing.assert_array_equal(out, expected)
    dout = rng.standard_normal(out.shape).astype(dtype)
    np.testing.assert_array_equal(kernels.maxpool_backward(dout, cache),
                                  reference.maxpool_backward(dout, expected_cache))


def test_outputs_survive_the_next_call_that_reuses_the_workspace(cython_backend, rng):
    x, W, b = conv_problem(rng, 4)
    out, cache = kernels.conv_forward(x, W, b, 1, 1)
    grads = kernels.conv_backward(np.ones_like(out), cache, W)
    pooled, pool_cache = kernels.maxpool_forward(x, 2, 2, 2, 0)
    pool_dx = kernels.maxpool_backward(np.ones_like(pooled), pool_cache)
    kept = [a.copy() for a in (out, *grads, pooled, pool_dx)]

    x2, W2, b2 = conv_problem(rng, 4)
    out2, cache2 = kernels.conv_forward(x2, W2, b2, 1, 1, workspace=cache)
    kernels.conv_backward(rng.standard_normal(out2.shape), cache2, W2)
    pooled2, pool_cache2 = kernels.maxpool_forward(x2, 2, 2, 2, 0, workspace=pool_cache)
    kernels.maxpool_backward(rng.standard_normal(pooled2.shape), pool_cache2)
    for now, before in zip((out, *grads, pooled, pool_dx), kept):
        np.testing.assert_array_equal(now, before)


def test_thread_pool_is_reported_as_built(cython_backend, monkeypatch):
    monkeypatch.setenv("FASTCONV_NUM_THREADS", "2")
    reported = info.collect()["pool"]
    if _parallel.threaded():
        assert reported.startswith("threads")
        assert cython_backend.parallel_threads() == 2
    else:
        assert reported.startswith("serial")
        assert cython_backend.parallel_threads() == 1


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernels_run_on_fastconv_num_threads(cython_backend, monkeypatch, threads):
    monkeypatch.setenv("FASTCONV_NUM_THREADS", str(threads))
    expected = threads if _parallel.threaded() else 1
    assert cython_backend.parallel_threads() == expected


def run_every_kernel(backend, rng_seed, dtype):
    """Every kernel, on inputs large enough to be split across two threads."""
    rng = np.random.default_rng(rng_seed)
    # batch 37 > DW_GROUPS: several images per group in conv backward; stride 2 takes the im2col path
    x, W, b = conv_problem(rng, 37, dtype, channels=5, size=11, filters=6)
    out, cache = kernels.conv_forward(x, W, b, 2, 1)
    dx, dW, db = kernels.conv_backward(rng.standard_normal(out.shape).astype(dtype), cache, W)
    direct_out, direct_cache = kernels.conv_forward(x, W, b, 1, 1)
    direct_grads = kernels.conv_backward(rng.standard_normal(direct_out.shape).astype(dtype), direct_cache, W)
    col = kernels.im2col(x, 3, 2, 1, 1)
    folded = kernels.col2im(col, x.shape, 3, 2, 1, 1)
    pool_in = np.round(rng.standard_normal((2, _threads.LEAST_WORK["pool"])).astype(dtype)).reshape(16, -1, 32, 32)
    pooled, pool_cache = kernels.maxpool_forward(pool_in, 3, 3, 2, 1)
    pool_dx = kernels.maxpool_backward(rng.standard_normal(pooled.shape).astype(dtype), pool_cache)
    relu_bytes = 2 * max(_threads.LEAST_WORK["relu_forward"], _threads.LEAST_WORK["relu_backward"])
    relu_in = rng.standard_normal(relu_bytes // np.dtype(dtype).itemsize).astype(dtype)
    relu_out, mask = kernels.relu_forward(relu_in)
    relu_dx = kernels.relu_backward(rng.standard_normal(mask.shape).astype(dtype), mask)
    return out, dx, dW, db, direct_out, *direct_grads, col, folded, pooled, pool_dx, relu_out, mask, relu_dx


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_results_are_bitwise_identical_on_one_and_two_threads(cython_backend, monkeypatch, dtype):
    monkeypatch.setenv("FASTCONV_NUM_THREADS", "1")
    serial = run_every_kernel(cython_backend, 7, dtype)
    monkeypatch.setenv("FASTCONV_NUM_THREADS", "2")
    parallel = run_every_kernel(cython_backend, 7, dtype)
    for one, two in zip(serial, parallel):
        assert one.dtype == two.dtype
        np.testing.assert_array_equal(one, two)


def blas_thread_counts():
    return [(lib["filepath"], lib["num_threads"]) for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_blas_runs_single_threaded_inside_a_call_and_is_restored_after(cython_backend, rng):
    before = blas_thread_counts()
    x, W, b = conv_problem(rng, 3)
    out, cache = kernels.conv_forward(x, W, b, 1, 1)
    kernels.conv_backward(out, cache, W)
    assert blas_thread_counts() == before
    with cython_backend._single_threaded_blas:  # the limiter the backend shares with numba
        inside = blas_thread_counts()
    assert inside and all(threads == 1 for _, threads in inside)
    assert blas_thread_counts() == before


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chapter8_network_gradient_matches_reference(cython_backend, dtype):
    rng = np.random.default_rng(3)
    x = rng.random((3, 1, 28, 28))
    t = rng.integers(0, 10, 3)
    np.random.seed(0)
    network = DeepConvNet(dtype=dtype)
    np.random.seed(1)  # the same dropout masks on both backends
    grads = network.gradient(x, t)
    with fastconv.use_backend("reference"):
        np.random.seed(1)
        expected = network.gradient(x, t)
    assert grads.keys() == expected.keys()
    for key in grads:
        assert_close_to_reference(grads[key], expected[key])


def test_compiled_variants_are_those_of_the_plan_in_its_order(cython_backend):
    # dconv.h's list of variants (its enum) against _plan.VARIANTS, and what each is compiled with
    assert _direct.VARIANTS == _plan.VARIANTS
    for name in _plan.VARIANTS:
        assert _direct.compiled_variant(name) in (None, (_plan.VECTOR_BYTES[name], _plan.REGISTERS[name]))
    assert cython_backend.available_variants() == tuple(v for v in _plan.VARIANTS if _direct.available(v))


@pytest.mark.parametrize("registers", sorted(_plan.FORWARD_TILES))
def test_compiled_tiles_are_the_plans(registers):
    # dconv_tiles.h is what is compiled, the plan what is asked for: the same tiles in the same order
    assert _direct.tiles("forward", registers) == _plan.FORWARD_TILES[registers]
    assert _direct.tiles("pixel", registers) == _plan.PIXEL_TILES[registers]
    channel_tiles = _direct.tiles("channel", registers)
    assert tuple(count for count, _, _ in channel_tiles) == _plan.CHANNEL_TILES[registers]
    paired = {count for count, _, is_paired in channel_tiles if is_paired}
    # every channel tile a plan that pairs blocks of output channels can cut is compiled paired
    wanted = set()
    for variant in _plan.VARIANTS:
        if _plan.REGISTERS[variant] != registers:
            continue
        for dtype in (np.float32, np.float64):
            lanes = _plan.LANES[variant][np.dtype(dtype)]
            for channels in range(1, 40):
                plan = _plan.conv_plan((2, channels, 6, 6), (3 * lanes, channels, 3, 3), 1, 1, dtype, variant)
                if plan.pair_blocks:
                    wanted |= {count for _, count in plan.channel_tiles}
    assert paired == wanted
    assert all(count <= _plan.PAIR_CHANNELS for count in paired)


@pytest.mark.parametrize("machine, pointer_bits, registers", [
    ("x86_64", 64, 16), ("AMD64", 64, 16), ("i686", 32, 16),       # SSE2
    ("aarch64", 64, 32), ("arm64", 64, 32), ("ARM64", 64, 32),      # NEON on AArch64 (Linux, macOS, Windows)
    ("aarch64", 32, 16), ("armv7l", 32, 16),                        # 32-bit ARM
])
def test_portable_variant_registers_follow_the_machine(machine, pointer_bits, registers):
    # dconv_generic.c compiles the tiles of 32 registers where __aarch64__ is defined, of 16 elsewhere
    assert _plan._portable_registers(machine, pointer_bits) == registers


def test_plan_registers_are_those_of_this_machine():
    bits = 64 if sys.maxsize > 2 ** 32 else 32
    assert _plan.REGISTERS["generic"] == _plan._portable_registers(_plan._MACHINE, bits)
    if _plan._MACHINE.lower() in ("x86_64", "amd64"):
        assert _plan.REGISTERS == {"avx512": 32, "avx2": 16, "generic": 16}
    assert _direct.compiled_variant("generic") in (None, (16, _plan.REGISTERS["generic"]))


@pytest.mark.slow
def test_kernels_and_pool_pass_their_c_test():
    # tools/ctest: every variant this CPU runs, every forward tile, against a reference, without Python
    script = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "ctest", "run.sh")
    if not os.path.exists(script) or shutil.which("bash") is None or shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("needs the checkout's tools/ctest, bash and a C compiler")
    result = subprocess.run(["bash", script, "native"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "dconv_test: ok" in result.stdout


@pytest.mark.parametrize("geometry", [(3, 3, 2, 1), (2, 2, 1, 1), (3, 3, 1, 1), (2, 2, 2, 0), (4, 4, 3, 2)])
def test_pool_cache_arg_max_is_the_references(cython_backend, geometry, rng, dtype):
    # source (y * W + x of each maximum, -1 where padding won) read as the book's arg_max
    pool_h, pool_w, stride, pad = geometry
    x = rng.integers(-1, 2, (2, 3, 7, 8)).astype(dtype)  # many ties
    x[rng.random(x.shape) < 0.1] = -np.inf  # windows where a padded cell comes first and ties
    x[rng.random(x.shape) < 0.03] = np.nan
    out, cache = cython_backend.maxpool_forward(x, pool_h, pool_w, stride, pad, None)
    expected_out, expected_cache = reference.maxpool_forward(x, pool_h, pool_w, stride, pad, None)
    np.testing.assert_array_equal(out, expected_out)
    np.testing.assert_array_equal(cache.arg_max, expected_cache.arg_max)


def test_the_extensions_refuse_sizes_that_do_not_match_their_arrays():
    x = np.zeros((2, 3, 6, 6))
    col = np.empty((2 * 6 * 6, 3 * 9))
    scratch = np.empty(col.size)
    with pytest.raises(ValueError):  # 5 x 5 windows per image, but col has rows for 6 x 6
        _im2col.im2col(x, col, 3, 3, 1, 1, 5, 5, scratch, 1)
    with pytest.raises(ValueError):
        _im2col.col2im(col, x, 3, 3, 1, 1, 6, 7, scratch, 1)
    with pytest.raises(ValueError):  # more 2 x 2 windows than the planes hold
        _pool.maxpool_forward(x, np.empty((2, 3, 4, 3)), np.empty(2 * 3 * 4 * 3, dtype=np.intc), 2, 2, 2, 0, 1)
    with pytest.raises(ValueError):
        _pool.maxpool_forward(x, np.empty((2, 3, 3, 3)), np.empty(7, dtype=np.intc), 2, 2, 2, 0, 1)


# --------------------------------------------------------------------------- its two convolution engines

def integer_problem(rng, dtype, shape=(2, 5, 9, 6), filters=7, fh=3, fw=2):
    """Integers whose every partial sum is exact in float32: both engines must give the same bits."""
    x = rng.integers(-4, 5, shape).astype(dtype)
    w = rng.integers(-1, 2, (filters, shape[1], fh, fw)).astype(dtype)
    return x, w, rng.integers(-4, 5, filters).astype(dtype)


@pytest.mark.parametrize("variant", _plan.VARIANTS)
def test_direct_and_im2col_engines_agree(cython_backend, variant, dtype, rng):
    if variant not in cython_backend.available_variants():
        pytest.skip(f"this CPU does not run the {variant} kernels")
    x, w, b = integer_problem(rng, dtype, (2, 32, 14, 14), 32, 3, 3)
    dout = rng.integers(-4, 5, (2, 32, 16, 16)).astype(dtype)
    results = []
    for engine in cython_backend.CONV_ENGINES:
        with cython_backend._force_variant(variant), cython_backend.conv_engine(engine):
            out, cache = kernels.conv_forward(x, w, b, 1, 2)
            results.append((out,) + tuple(kernels.conv_backward(dout, cache, w)))
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("engine", ["direct", "im2col"])
@pytest.mark.parametrize("stride", [1, 2])
def test_changing_x_after_forward_does_not_change_the_gradients(cython_backend, engine, stride, dtype, rng):
    x, w, b = integer_problem(rng, dtype)
    with cython_backend.conv_engine(engine):
        out, cache = kernels.conv_forward(x, w, b, stride, 1)
        dout = rng.integers(-4, 5, out.shape).astype(dtype)
        _, expected_dw, _ = reference.conv_backward(dout, reference.conv_forward(x, w, b, stride, 1, None)[1], w)
        x[...] = 7  # the caller reuses its input buffer
        dx, dW, db = kernels.conv_backward(dout, cache, w)
    np.testing.assert_array_equal(dW, expected_dw)


def test_a_cache_whose_buffers_were_taken_over_refuses_backward(cython_backend, rng):
    x, w, b = integer_problem(rng, np.float64)
    with cython_backend.conv_engine("direct"):
        out, first = cython_backend.conv_forward(x, w, b, 1, 1, None)
        cython_backend.conv_forward(x, w, b, 1, 1, first)
        with pytest.raises(ValueError, match="taken over"):
            cython_backend.conv_backward(np.ones_like(out), first, w)


@pytest.mark.parametrize("engine", ["direct", "im2col"])
def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(cython_backend, engine, dtype):
    x = np.zeros((0, 3, 6, 6), dtype=dtype)
    w = np.ones((4, 3, 3, 3), dtype=dtype)
    with cython_backend.conv_engine(engine):
        out, cache = cython_backend.conv_forward(x, w, np.ones(4, dtype=dtype), 1, 1, None)
        assert out.shape == (0, 4, 6, 6) and out.dtype == dtype
        dx, dW, db = cython_backend.conv_backward(out, cache, w)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dW, np.zeros_like(w))
    np.testing.assert_array_equal(db, np.zeros(4, dtype=dtype))


@pytest.mark.parametrize("geometry", [(2, 5, 7, 9, 6, 3, 2, 1), (1, 3, 5, 5, 5, 1, 1, 0), (2, 20, 3, 6, 8, 5, 3, 2),
                                      (5, 17, 33, 4, 4, 2, 2, 0)])
def test_weights_packed_in_c_match_the_plan(cython_backend, geometry, dtype, rng):
    N, C, K, H, W, FH, FW, pad = geometry
    w = rng.standard_normal((K, C, FH, FW)).astype(dtype)
    plan = _plan.conv_plan((N, C, H, W), w.shape, 1, pad, dtype, cython_backend.simd_variant())
    for tile_pass, backward_data, expected in [(plan.forward, False, _plan.pack_forward_weights(plan, w)),
                                               (plan.backward_data, True, _plan.pack_backward_data_weights(plan, w))]:
        np.testing.assert_array_equal(cython_backend._packed_weights(w, tile_pass.k_tile, backward_data),
                                      expected.reshape(-1))


def test_info_names_the_variant_in_use(cython_backend):
    for variant in cython_backend.available_variants():
        with cython_backend._force_variant(variant):
            assert info.collect()["simd"].split()[0] == variant == cython_backend.simd_variant()


def test_forcing_a_variant_the_cpu_lacks_is_an_error(cython_backend):
    with pytest.raises(ValueError):
        with cython_backend._force_variant("no-such-variant"):
            pass


def run_python(code, timeout=120):
    import os
    import subprocess
    import sys
    import textwrap
    env = dict(os.environ, FASTCONV_BACKEND="cython", FASTCONV_NUM_THREADS="2")
    # run from the tests' folder: the repository root would put the unbuilt source tree first on the path
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(__file__))


def test_a_child_forked_after_kernels_ran_runs_them_too(cython_backend):
    # a hang fails the test through the timeouts instead of blocking it
    result = run_python("""
        import multiprocessing as mp
        import numpy as np
        from fastconv import kernels

        def work():
            x = np.ones((20, 8, 20, 20))
            out, cache = kernels.conv_forward(x, np.ones((16, 8, 3, 3)), np.zeros(16), 1, 1)
            kernels.conv_backward(out, cache, np.ones((16, 8, 3, 3)))
            kernels.maxpool_forward(kernels.relu_forward(x)[0], 2, 2, 2, 0)

        work()
        outcomes = []
        for _ in range(6):  # several children: a race in the child's new pool shows up in some
            child = mp.get_context("fork").Process(target=work)
            child.start()
            child.join(60)
            hung = child.is_alive()
            if hung:
                child.kill()
            outcomes.append("hung" if hung else f"exit {child.exitcode}")
            work()
        print(" ".join(sorted(set(outcomes))))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exit 0", result.stdout + result.stderr


def test_importing_and_running_kernels_changes_no_environment_variable(cython_backend):
    result = run_python("""
        import os
        before = dict(os.environ)
        import numpy as np
        import fastconv
        from fastconv import kernels
        out, cache = kernels.conv_forward(np.ones((4, 3, 8, 8)), np.ones((2, 3, 3, 3)), np.zeros(2), 1, 1)
        kernels.conv_backward(out, cache, np.ones((2, 3, 3, 3)))
        print(sorted(set(os.environ.items()) ^ set(before.items())))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
