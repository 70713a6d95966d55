"""The numba backend's direct convolution: its vector intrinsics and kernels, against NumPy and the reference.

Every variant of fastconv._plan is forced in turn (AVX-512, AVX2 and
generic tiles and vector widths run on any x86-64 CPU), on geometries with
channel counts that are not multiples of the vector width, one input channel,
non-square filters, every pad the direct kernels take, and tiny images.

Runs as well with ``NUMBA_DISABLE_JIT=1``, where the intrinsics are NumPy
stand-ins.
"""
import numpy as np
import pytest

import fastconv
from fastconv import _plan, kernels
from fastconv.backends import reference

from conftest import assert_subnormals_count_as_zero, conv_relu_reference

nb = pytest.importorskip("fastconv.backends.numba", reason="numba backend unavailable (is numba installed?)")
direct = nb._direct
config, njit = nb.numba.config, nb.numba.njit

# (N, C, H, W, K, fh, fw, pad), all stride 1: the direct kernels' geometries
GEOMETRIES = [
    (2, 1, 28, 28, 16, 3, 3, 1),  # the network's first layer: one input channel
    (2, 16, 14, 14, 32, 3, 3, 2),  # pad 2: a larger output
    (3, 5, 7, 6, 7, 3, 3, 1),
    (2, 17, 5, 9, 20, 3, 2, 0),  # non-square filters, channels past a whole vector
    (2, 3, 6, 5, 4, 5, 5, 4),  # the largest pad the direct kernels take
    (2, 2, 4, 7, 3, 1, 1, 0),  # 1x1 filters
    (1, 33, 3, 3, 9, 3, 3, 1),
    (2, 2, 1, 1, 3, 1, 1, 0),  # one pixel
    (2, 4, 2, 3, 65, 2, 3, 1),  # more filters than a tile holds
    (5, 3, 8, 8, 16, 3, 3, 1),  # several images per group
    (2, 1, 9, 8, 20, 5, 5, 2),  # one input channel: 25 taps, in more than one tile; two blocks of filters
]
IDS = ["N{}C{}_{}x{}_K{}_f{}x{}_p{}".format(*g) for g in GEOMETRIES]


# every geometry on this CPU's variant; a few of them, the awkward ones, on every variant
CASES = [(None, g) for g in GEOMETRIES] + [(v, GEOMETRIES[i]) for v in _plan.VARIANTS for i in (0, 3, 4, 8, 10)]
CASE_IDS = [f"{v or 'host'}-{i}" for v, i in zip([c[0] for c in CASES], [IDS[GEOMETRIES.index(c[1])] for c in CASES])]


@pytest.fixture
def dw_groups(monkeypatch):
    """Sets fastconv._plan.DW_GROUPS for the test (plans are remembered: forgotten before and after)."""
    def set_groups(count):
        monkeypatch.setattr(_plan, "DW_GROUPS", count)
        _plan._conv_plan.cache_clear()
    yield set_groups
    _plan._conv_plan.cache_clear()


@pytest.fixture
def numba_backend():
    with fastconv.use_backend("numba"):
        yield


def conv_case(geometry, dtype, rng, integers=False):
    N, C, H, W, K, fh, fw, pad = geometry
    out_h, out_w = H + 2 * pad - fh + 1, W + 2 * pad - fw + 1
    if integers:  # every partial sum exact in float32: any summation order gives the same bits
        x = rng.integers(-4, 5, (N, C, H, W))
        Wt = rng.integers(-1, 2, (K, C, fh, fw))
        b = rng.integers(-4, 5, K)
        dout = rng.integers(-4, 5, (N, K, out_h, out_w))
    else:
        x = rng.standard_normal((N, C, H, W))
        Wt = rng.standard_normal((K, C, fh, fw))
        b = rng.standard_normal(K)
        dout = rng.standard_normal((N, K, out_h, out_w))
    return [a.astype(dtype) for a in (x, Wt, b, dout)] + [pad]


def run_fast(x, Wt, b, dout, pad):
    out, cache = kernels.conv_forward(x, Wt, b, 1, pad)
    assert cache.plan.direct and cache.plan.variant == direct.variant()
    return (out,) + kernels.conv_backward(dout, cache, Wt)


def run_reference(x, Wt, b, dout, pad):
    out, cache = reference.conv_forward(x, Wt, b, 1, pad, None)
    return (out,) + reference.conv_backward(dout, cache, Wt)


@pytest.mark.parametrize("variant,geometry", CASES, ids=CASE_IDS)
def test_integer_data_gives_the_references_bits(variant, geometry, dtype, rng, numba_backend, monkeypatch, tile_kind):
    monkeypatch.setattr(direct, "VARIANT", variant)
    case = conv_case(geometry, dtype, rng, integers=True)
    for got, expected in zip(run_fast(*case), run_reference(*case)):
        assert got.dtype == expected.dtype == dtype
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("variant,geometry", CASES, ids=CASE_IDS)
def test_fused_relu_on_integer_data_gives_the_references_bits(variant, geometry, dtype, rng, numba_backend,
                                                              monkeypatch, tile_kind):
    monkeypatch.setattr(direct, "VARIANT", variant)
    x, Wt, b, dout, pad = conv_case(geometry, dtype, rng, integers=True)
    out, cache = kernels.conv_forward(x, Wt, b, 1, pad, relu=True)
    assert cache.plan.direct
    got = (out,) + kernels.conv_backward(dout, cache, Wt)
    for value, expected in zip(got, conv_relu_reference(x, Wt, b, 1, pad, dout)):
        assert value.dtype == dtype
        np.testing.assert_array_equal(value, expected)


@pytest.mark.skipif(config.DISABLE_JIT, reason="the pure-Python stand-ins compute with NumPy, which keeps subnormals")
def test_subnormal_numbers_count_as_zero_in_the_kernels_only(dtype, numba_backend):
    """The compiled kernels flush subnormals on their threads while they run; the caller's arithmetic
    keeps them afterwards."""
    assert_subnormals_count_as_zero(dtype, run_fast)


def relative_error(got, expected):
    scale = np.linalg.norm(expected)
    return np.linalg.norm(got.astype(np.float64) - expected) / (scale if scale else 1.0)


@pytest.mark.parametrize("variant,geometry", CASES, ids=CASE_IDS)
def test_random_data_within_the_error_bounds(variant, geometry, dtype, rng, numba_backend, monkeypatch, tile_kind):
    """Relative L2 error against the reference run in float64: 1e-12 in float64; in float32 1e-5 for
    out and dx, 1e-4 for dW and db (sums over the whole batch)."""
    monkeypatch.setattr(direct, "VARIANT", variant)
    case = conv_case(geometry, dtype, rng)
    expected = run_reference(*[a.astype(np.float64) for a in case[:4]], case[4])
    bounds = (1e-12,) * 4 if dtype == np.float64 else (1e-5, 1e-5, 1e-4, 1e-4)
    for got, want, bound in zip(run_fast(*case), expected, bounds):
        assert got.dtype == dtype
        assert relative_error(got, want) <= bound


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[2], GEOMETRIES[9]], ids=[IDS[0], IDS[2], IDS[9]])
def test_one_and_two_threads_give_the_same_bits(geometry, dtype, rng, numba_backend, monkeypatch, dw_groups):
    monkeypatch.setattr(nb, "MIN_ELEMENTS_PER_THREAD", 1)
    dw_groups(3)
    case = conv_case(geometry, dtype, rng)
    results = []
    for threads in ("1", "2"):
        monkeypatch.setenv("FASTCONV_NUM_THREADS", threads)
        results.append(run_fast(*case))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_backward_does_not_read_the_callers_input(rng, numba_backend):
    x, Wt, b, dout, pad = conv_case(GEOMETRIES[2], np.float64, rng)
    expected = run_reference(x, Wt, b, dout, pad)
    _, cache = kernels.conv_forward(x, Wt, b, 1, pad)
    x[...] = 1e6  # changed in place between forward and backward
    for got, want in zip(kernels.conv_backward(dout, cache, Wt), expected[1:]):
        assert relative_error(got, want) <= 1e-12


def test_a_cache_given_as_workspace_refuses_backward(rng):
    """Called directly (the kernel interface refuses such a cache before the backend sees it)."""
    x, Wt, b, dout, pad = conv_case(GEOMETRIES[2], np.float64, rng)
    _, state = nb.conv_forward(x, Wt, b, 1, pad, None)
    _, later = nb.conv_forward(x, Wt, b, 1, pad, state)
    assert later.packed is not None
    with pytest.raises(ValueError, match="reused as the workspace of a later forward call"):
        nb.conv_backward(dout, state, Wt)


def test_the_host_variant_is_one_the_plan_knows():
    assert direct.host_variant() in _plan.VARIANTS
    assert direct.variant() in _plan.VARIANTS


# --------------------------------------------------------------------------- the vector intrinsics

@pytest.mark.parametrize("rows,columns,lanes", [(1, 1, 2), (3, 2, 4), (8, 3, 16), (16, 1, 8)])
def test_tile_intrinsics_against_numpy(rows, columns, lanes, dtype, rng):
    width = columns * lanes
    array = rng.standard_normal(40).astype(dtype)
    weights = rng.standard_normal(width).astype(dtype)
    start = rng.standard_normal(rows * width).astype(dtype)
    index, step = 3, 2

    def program(array, weights, out, rows, columns, lanes):
        acc = direct.tile_load(out, 0, len(columns) * len(lanes), rows, columns, lanes)
        vectors = direct.tile_load(weights, 0, 0, direct._ONE, columns, lanes)
        acc = direct.tile_outer_fma(acc, vectors, array, index, step)
        direct.tile_store(out, 0, len(columns) * len(lanes), acc)
        splat = direct.tile_splat(array, index, rows, columns, lanes)
        direct.tile_store(out, len(rows) * len(columns) * len(lanes), len(columns) * len(lanes), splat)

    compiled = program if config.DISABLE_JIT else njit(program)
    out = np.concatenate([start, np.full(rows * width, np.nan, dtype=dtype)])
    compiled(array, weights, out, direct.token(rows), direct.token(columns), direct.token(lanes))
    scalars = array[index + step * np.arange(rows)]
    expected = start.reshape(rows, width).astype(np.float64) + np.outer(scalars, weights)
    tolerance = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out[:rows * width].reshape(rows, width), expected, rtol=tolerance, atol=tolerance)
    splatted = np.repeat(array[index:index + rows], width).reshape(rows, width)  # consecutive values, one per row
    np.testing.assert_array_equal(out[rows * width:].reshape(rows, width), splatted)


@pytest.mark.parametrize("rows,columns,lanes", [(1, 1, 4), (3, 2, 8), (2, 1, 16)])
def test_masked_tile_load_zeroes_where_the_mask_is_not_positive(rows, columns, lanes, dtype, rng):
    size = 60
    array = rng.standard_normal(size).astype(dtype)
    mask = rng.standard_normal(size).astype(dtype)
    mask[:12] = [0.0, -0.0, np.nan, -np.inf, np.inf, 1e-30, -1e-30, 0.0, np.nan, 2.0, -2.0, 0.0]
    index, row_step = 1, 17

    def program(array, mask, out, rows, columns, lanes):
        direct.tile_store(out, index, row_step, direct.tile_load_masked(array, mask, index, row_step, rows, columns,
                                                                        lanes))

    compiled = program if config.DISABLE_JIT else njit(program)
    out = np.full(size, 7.0, dtype=dtype)
    compiled(array, mask, out, direct.token(rows), direct.token(columns), direct.token(lanes))
    expected = np.full(size, 7.0, dtype=dtype)
    for r in range(rows):
        at = slice(index + r * row_step, index + r * row_step + columns * lanes)
        expected[at] = np.where(mask[at] <= 0, 0, array[at])  # the book's mask: a NaN keeps the value
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("rows,columns,lanes", [(1, 1, 2), (6, 4, 16), (12, 2, 8)])
def test_gathering_fma_against_numpy(rows, columns, lanes, dtype, rng):
    width = columns * lanes
    array = rng.standard_normal(60).astype(dtype)
    weights = rng.standard_normal(width).astype(dtype)
    start = rng.standard_normal(rows * width).astype(dtype)
    offsets = rng.integers(0, 50, rows + 3).astype(np.int64)
    base, first = 7, 2

    def program(array, weights, offsets, out, rows, columns, lanes):
        acc = direct.tile_load(out, 0, len(columns) * len(lanes), rows, columns, lanes)
        vectors = direct.tile_load(weights, 0, 0, direct._ONE, columns, lanes)
        acc = direct.tile_gather_fma(acc, vectors, array, base, offsets, first)
        direct.tile_store(out, 0, len(columns) * len(lanes), acc)

    compiled = program if config.DISABLE_JIT else njit(program)
    out = start.copy()
    compiled(array, weights, offsets, out, direct.token(rows), direct.token(columns), direct.token(lanes))
    scalars = array[base + offsets[first:first + rows]]
    expected = start.reshape(rows, width).astype(np.float64) + np.outer(scalars, weights)
    tolerance = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out.reshape(rows, width), expected, rtol=tolerance, atol=tolerance)


def test_take_next_hands_out_each_task_once():
    take = direct.take_next if config.DISABLE_JIT else njit(lambda counter: direct.take_next(counter))
    counter = np.zeros(1, dtype=np.int64)
    assert [take(counter) for _ in range(4)] == [0, 1, 2, 3] and counter[0] == 4


# --------------------------------------------------------------------------- layouts

def test_channel_tiles_become_runs_of_one_size():
    sizes, repeats, taps = direct.channel_tile_runs(((0, 16), (16, 16), (32, 4), (36, 1)), 3, 16)
    assert [len(s) for s in sizes] == [16, 4, 1] and repeats.tolist() == [2, 1, 1] and not taps
    sizes, repeats, taps = direct.channel_tile_runs(_plan.channel_tiles(64, 32), 3, 16)
    assert [len(s) for s in sizes] == [16] and repeats.tolist() == [4] and not taps
    sizes, repeats, taps = direct.channel_tile_runs(_plan.channel_tiles(1, 32), 9, 16)  # one channel: 9 taps
    assert [len(s) for s in sizes] == [9] and repeats.tolist() == [1] and taps
    sizes, repeats, taps = direct.channel_tile_runs(_plan.channel_tiles(1, 32), 25, 8)  # 5 x 5 taps, 8 rows at most
    assert [len(s) for s in sizes] == [8, 1] and repeats.tolist() == [3, 1] and taps


def test_tap_offsets_walk_the_filter_in_a_padded_plane():
    assert direct.tap_offsets(2, 3, 10).tolist() == [0, 1, 2, 10, 11, 12]


def test_channel_tiles_wider_than_a_pair_tile_are_cut():
    sizes, repeats, taps = direct.channel_tile_runs(((0, 16), (16, 16), (32, 8), (40, 2)), 3, 8)
    assert [len(s) for s in sizes] == [8, 2] and repeats.tolist() == [5, 1] and not taps


def test_weight_gradient_layout_back_to_filters(rng):
    blocks, C, fh, fw, lanes, K = 2, 3, 2, 3, 8, 13
    summed = rng.standard_normal((blocks, C, fh, fw, lanes))
    dW = direct.weight_gradient_to_nchw(summed, K)
    assert dW.shape == (K, C, fh, fw) and dW.flags.c_contiguous
    for k, c, y, x in [(0, 0, 0, 0), (9, 2, 1, 2), (12, 1, 0, 1)]:
        assert dW[k, c, y, x] == summed[k // lanes, c, y, x, k % lanes]
