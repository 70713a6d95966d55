"""The direct convolution kernels of the cython backend, every SIMD variant, against the reference.

Exact: integer inputs in [-4, 4] and weights in {-1, 0, 1} keep every partial
sum an integer below 2**24, exact in float32 whatever the order of summation,
so each kernel must equal the reference (run in float64) bit for bit.
Random data: within 1e-12 relative (float64), 1e-5 (float32 forward and dx)
and 1e-4 (float32 dW and db) of the reference run in float64.
"""
import concurrent.futures
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastconv
from fastconv import _plan, info, kernels
from fastconv.backends import reference

from conftest import assert_subnormals_count_as_zero, conv_relu_reference

cython = pytest.importorskip("fastconv.backends.cython", reason="the cython backend must build here")

# (N, C, K, H, W, FH, FW, pad): the chapter-8 layers (smaller batch), then odd channel counts, one input
# channel (3 x 3 and other filters), non-square images and filters, 1x1 and 5x5 filters, no pad and the
# largest pad
GEOMETRIES = [
    (3, 1, 16, 28, 28, 3, 3, 1),
    (2, 16, 16, 28, 28, 3, 3, 1),
    (3, 16, 32, 14, 14, 3, 3, 1),
    (2, 32, 32, 14, 14, 3, 3, 2),
    (3, 32, 64, 7, 7, 3, 3, 1),
    (2, 64, 64, 7, 7, 3, 3, 1),
    (2, 5, 7, 9, 6, 3, 2, 1),
    (1, 3, 5, 5, 5, 1, 1, 0),
    (2, 20, 3, 6, 8, 5, 3, 2),
    (5, 17, 33, 4, 4, 2, 2, 0),
    (1, 2, 1, 1, 1, 1, 1, 0),
    (2, 1, 1, 3, 40, 3, 3, 0),
    (2, 1, 20, 7, 9, 5, 3, 2),
    (2, 1, 3, 4, 5, 1, 1, 0),
    (19, 3, 4, 5, 5, 3, 3, 1),
]


def geometry_id(g):
    return "N{}C{}K{}_{}x{}_f{}x{}_p{}".format(*g)


@pytest.fixture(params=_plan.VARIANTS)
def variant(request):
    """Each SIMD variant in turn, forced on the cython backend."""
    if request.param not in cython.available_variants():
        pytest.skip(f"this CPU does not run the {request.param} kernels")
    with fastconv.use_backend("cython"), cython._force_variant(request.param), cython.conv_engine("direct"):
        yield request.param


def integer_problem(rng, geometry, dtype):
    N, C, K, H, W, FH, FW, pad = geometry
    x = rng.integers(-4, 5, (N, C, H, W)).astype(dtype)
    w = rng.integers(-1, 2, (K, C, FH, FW)).astype(dtype)
    b = rng.integers(-4, 5, K).astype(dtype)
    return x, w, b


def reference_run(x, w, b, pad, dout):
    """Forward output and (dx, dW, db) of the reference, in float64."""
    f64 = [np.asarray(a, dtype=np.float64) for a in (x, w, b, dout)]
    out, cache = reference.conv_forward(f64[0], f64[1], f64[2], 1, pad, None)
    return (out,) + tuple(reference.conv_backward(f64[3], cache, f64[1]))


def direct_run(x, w, b, pad, dout):
    out, cache = kernels.conv_forward(x, w, b, 1, pad)
    return (out,) + tuple(kernels.conv_backward(dout, cache, w))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_integer_data_equals_reference_bit_for_bit(variant, geometry, dtype, rng, tile_kind):
    x, w, b = integer_problem(rng, geometry, dtype)
    N, C, K, H, W, FH, FW, pad = geometry
    out_shape = (N, K, H + 2 * pad - FH + 1, W + 2 * pad - FW + 1)
    dout = rng.integers(-4, 5, out_shape).astype(dtype)
    got = direct_run(x, w, b, pad, dout)
    for name, value, expected in zip(("out", "dx", "dW", "db"), got, reference_run(x, w, b, pad, dout)):
        assert value.dtype == dtype, name
        np.testing.assert_array_equal(value, expected.astype(dtype), err_msg=name)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_fused_relu_on_integer_data_equals_reference_bit_for_bit(variant, geometry, dtype, rng, tile_kind):
    """conv_forward(relu=True) and its backward; integer data makes many outputs exactly zero."""
    x, w, b = integer_problem(rng, geometry, dtype)
    N, C, K, H, W, FH, FW, pad = geometry
    dout = rng.integers(-4, 5, (N, K, H + 2 * pad - FH + 1, W + 2 * pad - FW + 1)).astype(dtype)
    out, cache = kernels.conv_forward(x, w, b, 1, pad, relu=True)
    got = (out,) + tuple(kernels.conv_backward(dout, cache, w))
    expected = conv_relu_reference(*(a.astype(np.float64) for a in (x, w, b)), 1, pad, dout.astype(np.float64))
    for name, value, want in zip(("out", "dx", "dW", "db"), got, expected):
        assert value.dtype == dtype, name
        np.testing.assert_array_equal(value, want.astype(dtype), err_msg=name)


@pytest.mark.parametrize("geometry", [g for g in GEOMETRIES if g[3] + 2 * g[7] - g[5] >= 1
                                      and g[4] + 2 * g[7] - g[6] >= 1], ids=geometry_id)
def test_inference_pooled_in_the_kernel_on_integer_data_equals_reference_bit_for_bit(variant, geometry, dtype, rng,
                                                                                    tile_kind):
    """conv_relu_pool_forward: the output is pooled 2 x 2 in the kernel and never written."""
    x, w, b = integer_problem(rng, geometry, dtype)
    pad = geometry[7]
    conv, _ = reference.conv_forward(*(a.astype(np.float64) for a in (x, w, b)), 1, pad, None)
    conv = np.where(conv <= 0, 0, conv)
    h, w_ = conv.shape[2] // 2 * 2, conv.shape[3] // 2 * 2
    expected = conv[:, :, :h, :w_].reshape(conv.shape[0], conv.shape[1], h // 2, 2, w_ // 2, 2).max(axis=(3, 5))
    pooled, _ = kernels.conv_relu_pool_forward(x, w, b, 1, pad)
    assert pooled.dtype == dtype
    np.testing.assert_array_equal(pooled, expected.astype(dtype))


def assert_relative(value, expected, tol, name):
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    err = float(np.max(np.abs(value.astype(np.float64) - expected)))
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def random_geometries(count, seed):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        FH, FW = rng.integers(1, 6, 2)
        pad = int(rng.integers(0, min(FH, FW)))
        H, W = (int(s) for s in rng.integers(max(FH, FW), 17, 2))
        yield (int(rng.integers(1, 6)), int(rng.integers(1, 40)), int(rng.integers(1, 40)), H, W,
               int(FH), int(FW), pad)


@pytest.mark.parametrize("geometry", GEOMETRIES + list(random_geometries(24, 5)), ids=geometry_id)
def test_random_data_is_close_to_reference(variant, geometry, dtype, rng, tile_kind):
    N, C, K, H, W, FH, FW, pad = geometry
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C, FH, FW)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    dout = rng.standard_normal((N, K, H + 2 * pad - FH + 1, W + 2 * pad - FW + 1)).astype(dtype)
    tolerances = (1e-12,) * 4 if dtype == np.float64 else (1e-5, 1e-5, 1e-4, 1e-4)
    got = direct_run(x, w, b, pad, dout)
    for name, value, expected, tol in zip(("out", "dx", "dW", "db"), got, reference_run(x, w, b, pad, dout),
                                          tolerances):
        assert value.dtype == dtype and value.shape == expected.shape, name
        assert_relative(value, expected, tol, name)


@pytest.mark.parametrize("geometry", [GEOMETRIES[1], GEOMETRIES[4], GEOMETRIES[12], (37, 5, 6, 11, 11, 3, 3, 1)],
                         ids=geometry_id)
def test_one_and_two_threads_give_identical_bits(variant, geometry, dtype, monkeypatch):
    runs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("FASTCONV_NUM_THREADS", threads)
        rng = np.random.default_rng(11)
        N, C, K, H, W, FH, FW, pad = geometry
        x = rng.standard_normal((N, C, H, W)).astype(dtype)
        w = rng.standard_normal((K, C, FH, FW)).astype(dtype)
        b = rng.standard_normal(K).astype(dtype)
        dout = rng.standard_normal((N, K, H + 2 * pad - FH + 1, W + 2 * pad - FW + 1)).astype(dtype)
        runs.append(direct_run(x, w, b, pad, dout))
    for other in runs[1:]:
        for one, two in zip(runs[0], other):
            np.testing.assert_array_equal(one, two)


def test_direct_and_im2col_engines_agree(variant, dtype, rng):
    x, w, b = integer_problem(rng, GEOMETRIES[3], dtype)
    dout = rng.integers(-4, 5, (2, 32, 16, 16)).astype(dtype)
    direct = direct_run(x, w, b, 2, dout)
    with cython.conv_engine("im2col"):
        unfolded = direct_run(x, w, b, 2, dout)
    for one, two in zip(direct, unfolded):
        np.testing.assert_array_equal(one, two)


def test_subnormal_numbers_count_as_zero_in_the_kernels_only(variant, dtype):
    """The direct kernels flush subnormals (late in training they would slow backward down twice over),
    on their own threads only: the caller's arithmetic keeps them."""
    assert_subnormals_count_as_zero(dtype, lambda x, w, b, dout, pad: direct_run(x, w, b, pad, dout))


@pytest.mark.parametrize("engine", cython.CONV_ENGINES)
@pytest.mark.parametrize("stride", [1, 2])
def test_changing_x_after_forward_does_not_change_the_gradients(engine, stride, dtype, rng):
    x, w, b = integer_problem(rng, GEOMETRIES[6], dtype)
    with fastconv.use_backend("cython"), cython.conv_engine(engine):
        out, cache = kernels.conv_forward(x, w, b, stride, 1)
        dout = rng.integers(-4, 5, out.shape).astype(dtype)
        _, expected_dw, _ = reference.conv_backward(dout, reference.conv_forward(x, w, b, stride, 1, None)[1], w)
        x[...] = 7  # the caller reuses its input buffer
        dx, dW, db = kernels.conv_backward(dout, cache, w)
    np.testing.assert_array_equal(dW, expected_dw)


def test_a_cache_whose_buffers_were_taken_over_refuses_backward(rng):
    x, w, b = integer_problem(rng, GEOMETRIES[6], np.float64)
    with fastconv.use_backend("cython"), cython.conv_engine("direct"):
        out, first = kernels.conv_forward(x, w, b, 1, 1)
        kernels.conv_forward(x, w, b, 1, 1, workspace=first)
        with pytest.raises(ValueError):
            kernels.conv_backward(np.ones_like(out), first, w)


@pytest.mark.parametrize("engine", cython.CONV_ENGINES)
def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(engine, dtype):
    x = np.zeros((0, 3, 6, 6), dtype=dtype)
    w = np.ones((4, 3, 3, 3), dtype=dtype)
    with cython.conv_engine(engine):
        out, cache = cython.conv_forward(x, w, np.ones(4, dtype=dtype), 1, 1, None)
        assert out.shape == (0, 4, 6, 6) and out.dtype == dtype
        dx, dW, db = cython.conv_backward(out, cache, w)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dW, np.zeros_like(w))
    np.testing.assert_array_equal(db, np.zeros(4, dtype=dtype))


def test_plan_covers_the_channels_with_compiled_tiles():
    for registers, sizes in _plan.CHANNEL_TILES.items():
        for channels in range(1, 70):
            tiles = _plan.channel_tiles(channels, registers)
            assert sum(count for _, count in tiles) == channels
            assert all(count in sizes for _, count in tiles)
            assert [first for first, _ in tiles] == list(np.cumsum([0] + [c for _, c in tiles])[:-1])


@pytest.mark.parametrize("geometry", GEOMETRIES[6:10], ids=geometry_id)
def test_weights_packed_in_c_match_the_plan(geometry, dtype, rng):
    N, C, K, H, W, FH, FW, pad = geometry
    w = rng.standard_normal((K, C, FH, FW)).astype(dtype)
    plan = _plan.conv_plan((N, C, H, W), w.shape, 1, pad, dtype, cython.simd_variant())
    for tile_pass, backward_data, expected in [(plan.forward, False, _plan.pack_forward_weights(plan, w)),
                                               (plan.backward_data, True, _plan.pack_backward_data_weights(plan, w))]:
        np.testing.assert_array_equal(cython._packed_weights(w, tile_pass.k_tile, backward_data), expected.reshape(-1))


def test_groups_cover_the_batch_in_order():
    for batch in (1, 7, 16, 100):
        groups = min(batch, _plan.DW_GROUPS)
        bounds = _plan.group_bounds(batch, groups)
        assert bounds[0][0] == 0 and bounds[-1][1] == batch
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:]))


def test_info_names_the_variant_in_use(variant):
    assert info.collect()["simd"].split()[0] == variant == cython.simd_variant()


def test_forcing_a_variant_the_cpu_lacks_is_an_error():
    with pytest.raises(ValueError):
        with cython._force_variant("no-such-variant"):
            pass


def test_kernels_called_from_several_threads_at_once_give_the_same_bits(monkeypatch):
    monkeypatch.setenv("FASTCONV_NUM_THREADS", "2")
    rng = np.random.default_rng(3)
    problems = [integer_problem(rng, GEOMETRIES[g], np.float32) + (GEOMETRIES[g][-1],) for g in (1, 2, 4, 12)]

    def run(problem):
        x, w, b, pad = problem
        with fastconv.use_backend("cython"):
            out, cache = kernels.conv_forward(x, w, b, 1, pad)
            return (out,) + tuple(kernels.conv_backward(out, cache, w))

    expected = [run(p) for p in problems]
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        results = list(executor.map(run, problems * 5))
    for got, want in zip(results, expected * 5):
        for one, two in zip(got, want):
            np.testing.assert_array_equal(one, two)


def run_python(code, timeout=120):
    env = dict(os.environ, FASTCONV_BACKEND="cython", FASTCONV_NUM_THREADS="2")
    # run from the tests' folder: the repository root would put the unbuilt source tree first on the path
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(__file__))


def test_a_child_forked_after_kernels_ran_runs_them_too():
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


def test_importing_and_running_kernels_changes_no_environment_variable():
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
