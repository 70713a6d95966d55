"""The direct convolution kernels of both fast backends, every SIMD variant and tile kind, against the reference.

Exact: integer inputs in [-4, 4] and weights in {-1, 0, 1} keep every partial
sum an integer below 2**24, exact in float32 whatever the order of summation,
so each kernel must equal the reference (run in float64) bit for bit. Random
data: within ``conftest.tolerance`` of the reference run in float64.

The default set runs every kernel (forward, fused ReLU, inference pooled in
the kernel, backward-data, backward-weights) on each fast backend, on the
host's variant, in both dtypes, on ``REPRESENTATIVE`` geometries with both
tile kinds (numba, which compiles each new geometry, on
``conftest.NUMBA_GEOMETRIES`` with the plan's tiles); the cython backend also
runs every compiled tile of the host's variant by forcing each one. The
``slow`` set runs the whole product: every variant on every geometry, random
geometries, and every numba tile.
"""
import concurrent.futures
import contextlib

import numpy as np
import pytest

import fastconv
from fastconv import _plan, _registry, _threads, kernels
from fastconv._checks import output_size
from fastconv.backends import reference

from conftest import (FAST_BACKENDS, NUMBA_GEOMETRIES, assert_close_to_reference, assert_subnormals_count_as_zero, conv_problem,
                      conv_relu_reference, forced_variant, geometry_id, host_variant)

# (N, C, K, H, W, FH, FW, stride, pad), stride 1: the geometries the direct kernels take
REPRESENTATIVE = NUMBA_GEOMETRIES + [  # the network's first layer (one input channel), a paired layer
    (2, 17, 20, 5, 9, 3, 2, 1, 0),  # non-square filters, channels past a whole tile, no pad
    (2, 3, 4, 6, 5, 5, 5, 1, 4),  # the largest pad the direct kernels take
    (2, 1, 20, 9, 8, 5, 5, 1, 2),  # one input channel: 25 taps in more than one tile; two blocks of filters
    (19, 3, 4, 5, 5, 3, 3, 1, 1),  # more images than groups of images
]
OTHERS = [
    (2, 16, 16, 28, 28, 3, 3, 1, 1),  # the rest of the chapter-8 layers (smaller batch)
    (2, 32, 32, 14, 14, 3, 3, 1, 2),
    (3, 32, 64, 7, 7, 3, 3, 1, 1),
    (2, 64, 64, 7, 7, 3, 3, 1, 1),
    (2, 5, 7, 9, 6, 3, 2, 1, 1),
    (1, 3, 5, 5, 5, 1, 1, 1, 0),  # 1x1 filters
    (2, 2, 3, 4, 7, 1, 1, 1, 0),
    (2, 20, 3, 6, 8, 5, 3, 1, 2),
    (5, 17, 33, 4, 4, 2, 2, 1, 0),
    (1, 2, 1, 1, 1, 1, 1, 1, 0),  # one pixel
    (2, 2, 3, 1, 1, 1, 1, 1, 0),
    (2, 1, 1, 3, 40, 3, 3, 1, 0),  # a wide image, one filter
    (2, 1, 3, 4, 5, 1, 1, 1, 0),
    (2, 5, 7, 7, 6, 3, 3, 1, 1),
    (1, 33, 9, 3, 3, 3, 3, 1, 1),
    (2, 4, 65, 2, 3, 2, 3, 1, 1),  # more filters than a tile holds
    (5, 3, 16, 8, 8, 3, 3, 1, 1),  # several images per group
]


def random_geometries(count, seed):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        FH, FW = rng.integers(1, 6, 2)
        pad = int(rng.integers(0, min(FH, FW)))
        H, W = (int(s) for s in rng.integers(max(FH, FW), 17, 2))
        yield (int(rng.integers(1, 6)), int(rng.integers(1, 40)), int(rng.integers(1, 40)), H, W,
               int(FH), int(FW), 1, pad)


RANDOM = list(random_geometries(24, 5))


# numba compiles each (variant, geometry, tile) anew: its slow set runs every geometry but the random ones on
# the host's variant and these, the awkward ones, on every variant and with the channels-in-lanes tile
NUMBA_AWKWARD = [
    (3, 1, 16, 28, 28, 3, 3, 1, 1),  # one input channel
    (2, 17, 20, 5, 9, 3, 2, 1, 0),  # non-square filters, channels past a whole vector
    (2, 3, 4, 6, 5, 5, 5, 1, 4),  # the largest pad
    (2, 4, 65, 2, 3, 2, 3, 1, 1),  # more filters than a tile holds
    (2, 1, 20, 9, 8, 5, 5, 1, 2),  # one input channel, 25 taps in more than one tile, two blocks of filters
]


def cases(geometries, slow_geometries=()):
    """(backend and variant, geometry, tile kind) params: ``geometries`` on the host's variant in the default
    set (numba: those of ``NUMBA_GEOMETRIES``, with the plan's grid tiles), the rest of the product slow."""
    params = []
    for name in FAST_BACKENDS:
        for variant in _plan.VARIANTS:
            for geometry in list(geometries) + list(slow_geometries):
                for tile in ("grid", "pixels"):
                    host = variant == host_variant(name)
                    if name == "numba":
                        if geometry in RANDOM or not ((host and tile == "grid") or geometry in NUMBA_AWKWARD):
                            continue
                        slow = not host or geometry not in NUMBA_GEOMETRIES or tile != "grid"
                    else:
                        slow = not host or geometry in slow_geometries
                    params.append(pytest.param((name, variant), geometry, tile,
                                               id=f"{name}-{variant}-{geometry_id(geometry)}-{tile}",
                                               marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.fixture
def fast(request):
    """Runs the test on the backend and variant of its (indirect) ``(name, variant)`` param."""
    name, variant = request.param
    with forced_variant(name, variant):
        yield name


def integer_problem(rng, geometry, dtype):
    """x, W, b, stride, pad, dout of integers whose every partial sum is exact in float32."""
    N, C, K, H, W, FH, FW, stride, pad = geometry
    out_h, out_w = output_size(H, FH, stride, pad), output_size(W, FW, stride, pad)
    x = rng.integers(-4, 5, (N, C, H, W)).astype(dtype)
    w = rng.integers(-1, 2, (K, C, FH, FW)).astype(dtype)
    b = rng.integers(-4, 5, K).astype(dtype)
    dout = rng.integers(-4, 5, (N, K, out_h, out_w)).astype(dtype)
    return x, w, b, stride, pad, dout


def in_float64(problem):
    return tuple(a.astype(np.float64) if isinstance(a, np.ndarray) else a for a in problem)


def reference_run(x, w, b, stride, pad, dout):
    """Forward output and (dx, dW, db) of the reference, in float64."""
    x, w, b, stride, pad, dout = in_float64((x, w, b, stride, pad, dout))
    out, cache = reference.conv_forward(x, w, b, stride, pad, None)
    return (out,) + tuple(reference.conv_backward(dout, cache, w))


def fast_run(x, w, b, stride, pad, dout, relu=False):
    out, cache = kernels.conv_forward(x, w, b, stride, pad, relu=relu)
    assert cache.plan.direct
    return (out,) + tuple(kernels.conv_backward(dout, cache, w))


def assert_exact(got, expected, dtype):
    for name, value, want in zip(("out", "dx", "dW", "db"), got, expected):
        assert value.dtype == dtype, name
        np.testing.assert_array_equal(value, want.astype(dtype), err_msg=name)


# --------------------------------------------------------------------------- every kernel against the reference

@pytest.mark.parametrize("fast,geometry,tile_kind", cases(REPRESENTATIVE, OTHERS), indirect=["fast", "tile_kind"])
def test_integer_data_equals_reference_bit_for_bit(fast, geometry, dtype, rng, tile_kind):
    problem = integer_problem(rng, geometry, dtype)
    assert_exact(fast_run(*problem), reference_run(*problem), dtype)


@pytest.mark.parametrize("fast,geometry,tile_kind", cases(REPRESENTATIVE, OTHERS), indirect=["fast", "tile_kind"])
def test_fused_relu_on_integer_data_equals_reference_bit_for_bit(fast, geometry, dtype, rng, tile_kind):
    """conv_forward(relu=True) and its backward; integer data makes many outputs exactly zero."""
    problem = integer_problem(rng, geometry, dtype)
    assert_exact(fast_run(*problem, relu=True), conv_relu_reference(*in_float64(problem)), dtype)


def poolable(geometries):
    """The geometries whose output has room for a 2 x 2 pooling window."""
    return [g for g in geometries if min(output_size(g[3], g[5], g[7], g[8]), output_size(g[4], g[6], g[7], g[8])) >= 2]


@pytest.mark.parametrize("fast,geometry,tile_kind", cases(poolable(REPRESENTATIVE), poolable(OTHERS)), indirect=["fast", "tile_kind"])
def test_inference_pooled_in_the_kernel_on_integer_data_equals_reference_bit_for_bit(fast, geometry, dtype, rng,
                                                                                    tile_kind):
    """conv_relu_pool_forward: the output is pooled 2 x 2 in the kernel and never written."""
    x, w, b, stride, pad, _ = problem = integer_problem(rng, geometry, dtype)
    conv = reference_run(*problem)[0]
    conv = np.where(conv <= 0, 0, conv)
    h, w_ = conv.shape[2] // 2 * 2, conv.shape[3] // 2 * 2
    expected = conv[:, :, :h, :w_].reshape(conv.shape[0], conv.shape[1], h // 2, 2, w_ // 2, 2).max(axis=(3, 5))
    pooled, _ = kernels.conv_relu_pool_forward(x, w, b, stride, pad)
    assert pooled.dtype == dtype
    np.testing.assert_array_equal(pooled, expected.astype(dtype))


@pytest.mark.parametrize("fast,geometry,tile_kind", cases(REPRESENTATIVE[:3], REPRESENTATIVE[3:] + OTHERS + RANDOM), indirect=["fast", "tile_kind"])
def test_random_data_is_close_to_reference(fast, geometry, dtype, rng, tile_kind):
    problem = conv_problem(rng, geometry, dtype)
    for name, got, expected in zip(("out", "dx", "dW", "db"), fast_run(*problem), reference_run(*problem)):
        assert_close_to_reference(got, expected, dtype, sums=name in ("dW", "db"))


# --------------------------------------------------------------------------- every compiled tile, forced

def _forward_tiles(registers):
    return ([(k_tile, vectors, False) for k_tile, vectors in _plan.FORWARD_TILES[registers]]
            + [(k_vectors, pixels, True) for k_vectors, pixels in _plan.PIXEL_TILES[registers]])


def tile_cases():
    params = []
    for name in FAST_BACKENDS:
        for variant in _plan.VARIANTS:
            registers = _plan.REGISTERS[variant]
            if name == "numba" and variant != host_variant(name):
                continue  # numba: the host's tiles; the other variants' through NUMBA_AWKWARD's plans
            for tile in _forward_tiles(registers):
                # numba compiles each tile anew: every tile but the plan's usual ones is slow there
                slow = variant != host_variant(name) or name != "cython"
                params.append(pytest.param((name, variant), tile, id=f"{name}-{variant}-{tile}",
                                           marks=[pytest.mark.slow] if slow else []))
    return params


@contextlib.contextmanager
def only_tile(tile):
    """The plan's forward and backward-data passes take ``tile`` (k_tile or vectors of channels, vectors or
    pixels, channels in lanes) wherever it fits."""
    costs = {**{t: 1e9 for t in _plan.TILE_COST}, **{t: 1e9 for t in _plan.PIXEL_TILE_COST}}
    key = ("pixels", tile[0], tile[1]) if tile[2] else tile[:2]
    costs[key] = 1.0
    saved = dict(_plan.TILE_COST), dict(_plan.PIXEL_TILE_COST)
    _plan.TILE_COST.update({k: v for k, v in costs.items() if k in _plan.TILE_COST})
    _plan.PIXEL_TILE_COST.update({k: v for k, v in costs.items() if k in _plan.PIXEL_TILE_COST})
    _plan._conv_plan.cache_clear()
    try:
        yield
    finally:
        _plan.TILE_COST.update(saved[0])
        _plan.PIXEL_TILE_COST.update(saved[1])
        _plan._conv_plan.cache_clear()


@pytest.mark.parametrize("fast,tile", tile_cases(), indirect=["fast"])
def test_every_forward_tile_equals_reference_bit_for_bit(fast, tile, dtype, rng):
    """Each compiled forward tile, in forward and in backward-data, with and without a fused ReLU; the
    channel counts are not multiples of the tile."""
    variant = _registry.backend_module().simd_variant()
    geometry = (3, 5, 2 * tile[0] * (_plan.LANES[variant][dtype] if tile[2] else 1) + 3, 6, 11, 3, 3, 1, 1)
    problem = integer_problem(rng, geometry, dtype)
    with only_tile(tile):
        plan = _plan.conv_plan(problem[0].shape, problem[1].shape, 1, 1, dtype, variant)
        assert (plan.forward.k_tile, plan.forward.vectors, plan.forward.channel_lanes)[1:] == tile[1:]
        assert_exact(fast_run(*problem), reference_run(*problem), dtype)
        assert_exact(fast_run(*problem, relu=True), conv_relu_reference(*in_float64(problem)), dtype)


def channel_tile_cases():
    params = []
    for name in FAST_BACKENDS:
        for variant in _plan.VARIANTS:
            if name == "numba" and variant != host_variant(name):
                continue
            for channels in sorted(set(_plan.CHANNEL_TILES[_plan.REGISTERS[variant]]) | {1, 23}):
                slow = variant != host_variant(name) or name != "cython"  # numba: tested on its geometries
                params.append(pytest.param((name, variant), channels, id=f"{name}-{variant}-C{channels}",
                                           marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.mark.parametrize("fast,channels", channel_tile_cases(), indirect=["fast"])
def test_every_backward_weights_tile_equals_reference_bit_for_bit(fast, channels, dtype, rng):
    """Input channel counts that are each compiled tile size (23: several tiles), with one block of
    filters and with several (paired where the plan pairs them)."""
    for filters in (3, 2 * _plan.LANES[_registry.backend_module().simd_variant()][dtype] + 1):
        problem = integer_problem(rng, (2, channels, filters, 5, 6, 3, 3, 1, 1), dtype)
        assert_exact(fast_run(*problem), reference_run(*problem), dtype)


# --------------------------------------------------------------------------- threads, subnormals, buffers

@pytest.mark.parametrize("name", FAST_BACKENDS)
@pytest.mark.parametrize("geometry", NUMBA_GEOMETRIES + [(37, 5, 6, 11, 11, 3, 3, 1, 1)], ids=geometry_id)
def test_one_two_and_three_threads_give_identical_bits(name, geometry, dtype, monkeypatch):
    monkeypatch.setitem(_threads.LEAST_WORK, "conv", 1)  # a thread for any work
    runs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("FASTCONV_NUM_THREADS", threads)
        with forced_variant(name, host_variant(name)):
            runs.append(fast_run(*conv_problem(np.random.default_rng(11), geometry, dtype)))
    for other in runs[1:]:
        for one, two in zip(runs[0], other):
            np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n == "numba" else []) for n in FAST_BACKENDS])
def test_subnormal_numbers_count_as_zero_in_the_kernels_only(name, dtype):
    """The direct kernels flush subnormals (late in training they would slow backward down twice over),
    on their own threads only: the caller's arithmetic keeps them."""
    if not _registry.backend_module(name).FLUSHES_SUBNORMALS:
        pytest.skip(f"the {name} kernels keep subnormal numbers here (as Python, or compiled for a CPU other than x86)")
    with forced_variant(name, host_variant(name)):
        assert_subnormals_count_as_zero(dtype, lambda x, w, b, dout, pad: fast_run(x, w, b, 1, pad, dout)[:4])


@pytest.mark.parametrize("name", FAST_BACKENDS)
def test_backward_does_not_read_the_callers_input(name, rng):
    x, w, b, stride, pad, dout = integer_problem(rng, NUMBA_GEOMETRIES[1], np.float64)
    expected = reference_run(x, w, b, stride, pad, dout)
    with forced_variant(name, host_variant(name)):
        _, cache = kernels.conv_forward(x, w, b, stride, pad)
        x[...] = 7  # the caller reuses its input buffer
        got = kernels.conv_backward(dout, cache, w)
    for value, want in zip(got, expected[1:]):
        np.testing.assert_array_equal(value, want)


@pytest.mark.parametrize("name", FAST_BACKENDS)
def test_kernels_called_from_several_threads_at_once_give_the_same_bits(name, monkeypatch):
    monkeypatch.setenv("FASTCONV_NUM_THREADS", "2")
    rng = np.random.default_rng(3)
    problems = [integer_problem(rng, g, np.float32) for g in NUMBA_GEOMETRIES]

    with forced_variant(name, host_variant(name)):  # chosen once: the choice is process-wide
        expected = [fast_run(*p) for p in problems]
        with concurrent.futures.ThreadPoolExecutor(4) as executor:
            results = list(executor.map(lambda p: fast_run(*p), problems * 3))
    for got, want in zip(results, expected * 3):
        for one, two in zip(got, want):
            np.testing.assert_array_equal(one, two)


# --------------------------------------------------------------------------- the plan

def test_plan_covers_the_channels_with_compiled_tiles():
    for registers, sizes in _plan.CHANNEL_TILES.items():
        for most in (None, _plan.PAIR_CHANNELS):
            for channels in range(1, 70):
                tiles = _plan.channel_tiles(channels, registers, most)
                assert sum(count for _, count in tiles) == channels
                assert all(count in sizes and (most is None or count <= most) for _, count in tiles)
                assert [first for first, _ in tiles] == list(np.cumsum([0] + [c for _, c in tiles])[:-1])


def test_the_plan_pairs_blocks_only_with_32_registers_and_two_blocks():
    for variant in _plan.VARIANTS:
        for filters in (3, 16, 17, 40):
            plan = _plan.conv_plan((2, 20, 6, 6), (filters, 20, 3, 3), 1, 1, np.float32, variant)
            pairs = _plan.REGISTERS[variant] == 32 and filters > _plan.LANES[variant][np.dtype(np.float32)]
            assert plan.pair_blocks == pairs
            widest = _plan.PAIR_CHANNELS if pairs else _plan.CHANNEL_TILES[_plan.REGISTERS[variant]][0]
            assert max(count for _, count in plan.channel_tiles) == widest


def test_groups_cover_the_batch_in_order():
    for batch in (1, 7, 16, 100):
        groups = min(batch, _plan.DW_GROUPS)
        bounds = _plan.group_bounds(batch, groups)
        assert bounds[0][0] == 0 and bounds[-1][1] == batch
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("geometry", [REPRESENTATIVE[2], OTHERS[4], OTHERS[7]], ids=geometry_id)
def test_the_plans_packed_weights_are_the_filters_in_tile_order(geometry, dtype, rng):
    """Each packed weight, read back by its (block, c, kh, kw, lane) index, is the filter it stands for."""
    N, C, K, H, W, FH, FW, stride, pad = geometry
    w = rng.standard_normal((K, C, FH, FW)).astype(dtype)
    plan = _plan.conv_plan((N, C, H, W), w.shape, 1, pad, dtype, _plan.VARIANTS[0])
    packed = _plan.pack_forward_weights(plan, w)
    k_tile = plan.forward.k_tile
    for k, c, y, x in [(0, 0, 0, 0), (K - 1, C - 1, FH - 1, FW - 1), (K // 2, C // 2, FH // 2, 0)]:
        assert packed[k // k_tile, c, y, x, k % k_tile] == w[k, c, y, x]
    flipped = _plan.pack_backward_data_weights(plan, w)
    c_tile = plan.backward_data.k_tile
    for k, c, y, x in [(0, 0, 0, 0), (K - 1, C - 1, FH - 1, FW - 1)]:
        assert flipped[c // c_tile, k, FH - 1 - y, FW - 1 - x, c % c_tile] == w[k, c, y, x]
