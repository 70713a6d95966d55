"""The numba backend's vector intrinsics and layouts, against NumPy (its kernels against the reference:
``test_direct_kernels.py``).

Runs as well with ``NUMBA_DISABLE_JIT=1``, where the intrinsics are NumPy
stand-ins.
"""
import numpy as np
import pytest

from fastconv import _plan

from conftest import NUMBA_GEOMETRIES, conv_problem

nb = pytest.importorskip("fastconv.backends.numba", reason="numba backend unavailable (is numba installed?)")
from fastconv.backends import _numba_backward as backward  # noqa: E402
from fastconv.backends import _numba_simd as simd  # noqa: E402

config, njit = nb.numba.config, nb.numba.njit


def test_a_cache_given_as_workspace_refuses_backward(rng):
    """Called directly (the kernel interface refuses such a cache before the backend sees it)."""
    x, Wt, b, stride, pad, dout = conv_problem(rng, NUMBA_GEOMETRIES[1], np.float64)
    _, state = nb.conv_forward(x, Wt, b, stride, pad, None)
    _, later = nb.conv_forward(x, Wt, b, stride, pad, state)
    assert later.packed is not None
    with pytest.raises(ValueError, match="reused as the workspace of a later forward call"):
        nb.conv_backward(dout, state, Wt)


def test_the_host_variant_is_one_the_plan_knows():
    assert simd.host_variant() in _plan.VARIANTS
    assert nb.simd_variant() in _plan.VARIANTS


# --------------------------------------------------------------------------- the vector intrinsics

@pytest.mark.parametrize("rows,columns,lanes", [(1, 1, 2), (3, 2, 4), (8, 3, 16), (16, 1, 8)])
def test_tile_intrinsics_against_numpy(rows, columns, lanes, dtype, rng):
    width = columns * lanes
    array = rng.standard_normal(40).astype(dtype)
    weights = rng.standard_normal(width).astype(dtype)
    start = rng.standard_normal(rows * width).astype(dtype)
    index, step = 3, 2

    def program(array, weights, out, rows, columns, lanes):
        acc = simd.tile_load(out, 0, len(columns) * len(lanes), rows, columns, lanes)
        vectors = simd.tile_load(weights, 0, 0, simd._ONE, columns, lanes)
        acc = simd.tile_outer_fma(acc, vectors, array, index, step)
        simd.tile_store(out, 0, len(columns) * len(lanes), acc)
        splat = simd.tile_splat(array, index, rows, columns, lanes)
        simd.tile_store(out, len(rows) * len(columns) * len(lanes), len(columns) * len(lanes), splat)

    compiled = program if config.DISABLE_JIT else njit(program)
    out = np.concatenate([start, np.full(rows * width, np.nan, dtype=dtype)])
    compiled(array, weights, out, simd.token(rows), simd.token(columns), simd.token(lanes))
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
        simd.tile_store(out, index, row_step, simd.tile_load_masked(array, mask, index, row_step, rows, columns,
                                                                        lanes))

    compiled = program if config.DISABLE_JIT else njit(program)
    out = np.full(size, 7.0, dtype=dtype)
    compiled(array, mask, out, simd.token(rows), simd.token(columns), simd.token(lanes))
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
        acc = simd.tile_load(out, 0, len(columns) * len(lanes), rows, columns, lanes)
        vectors = simd.tile_load(weights, 0, 0, simd._ONE, columns, lanes)
        acc = simd.tile_gather_fma(acc, vectors, array, base, offsets, first)
        simd.tile_store(out, 0, len(columns) * len(lanes), acc)

    compiled = program if config.DISABLE_JIT else njit(program)
    out = start.copy()
    compiled(array, weights, offsets, out, simd.token(rows), simd.token(columns), simd.token(lanes))
    scalars = array[base + offsets[first:first + rows]]
    expected = start.reshape(rows, width).astype(np.float64) + np.outer(scalars, weights)
    tolerance = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out.reshape(rows, width), expected, rtol=tolerance, atol=tolerance)


def test_take_next_hands_out_each_task_once():
    take = simd.take_next if config.DISABLE_JIT else njit(lambda counter: simd.take_next(counter))
    counter = np.zeros(1, dtype=np.int64)
    assert [take(counter) for _ in range(4)] == [0, 1, 2, 3] and counter[0] == 4


# --------------------------------------------------------------------------- layouts

def test_channel_tiles_become_runs_of_one_size():
    sizes, repeats, taps = backward.channel_tile_runs(((0, 16), (16, 16), (32, 4), (36, 1)), 3, 16)
    assert [len(s) for s in sizes] == [16, 4, 1] and repeats.tolist() == [2, 1, 1] and not taps
    sizes, repeats, taps = backward.channel_tile_runs(_plan.channel_tiles(64, 32), 3, 16)
    assert [len(s) for s in sizes] == [16] and repeats.tolist() == [4] and not taps
    sizes, repeats, taps = backward.channel_tile_runs(_plan.channel_tiles(1, 32), 9, 16)  # one channel: 9 taps
    assert [len(s) for s in sizes] == [9] and repeats.tolist() == [1] and taps
    sizes, repeats, taps = backward.channel_tile_runs(_plan.channel_tiles(1, 32), 25, 8)  # 5 x 5 taps, 8 rows at most
    assert [len(s) for s in sizes] == [8, 1] and repeats.tolist() == [3, 1] and taps


def test_tap_offsets_walk_the_filter_in_a_padded_plane():
    assert backward.tap_offsets(2, 3, 10).tolist() == [0, 1, 2, 10, 11, 12]


def test_channel_tiles_wider_than_a_pair_tile_are_cut():
    sizes, repeats, taps = backward.channel_tile_runs(((0, 16), (16, 16), (32, 8), (40, 2)), 3, 8)
    assert [len(s) for s in sizes] == [8, 2] and repeats.tolist() == [5, 1] and not taps


def test_weight_gradient_layout_back_to_filters(rng):
    blocks, C, fh, fw, lanes, K = 2, 3, 2, 3, 8, 13
    summed = rng.standard_normal((blocks, C, fh, fw, lanes))
    dW = backward.weight_gradient_to_nchw(summed, K)
    assert dW.shape == (K, C, fh, fw) and dW.flags.c_contiguous
    for k, c, y, x in [(0, 0, 0, 0), (9, 2, 1, 2), (12, 1, 0, 1)]:
        assert dW[k, c, y, x] == summed[k // lanes, c, y, x, k % lanes]
