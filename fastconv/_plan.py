"""How the fast backends cut a direct convolution into work: one plan for both.

``conv_plan(x_shape, w_shape, stride, pad, dtype, variant)`` decides, once, in
Python, everything a direct-convolution kernel needs: whether the direct
kernels apply at all, the register tiles, the split of work over threads, the
fixed image groups that keep dW and db independent of the thread count, and the
size of every buffer. A backend allocates what the plan says, packs the weights
with the helpers below and runs its kernels over the plan's numbers; it decides
nothing of this itself.

The algorithm (stride 1; ``x`` (N, C, H, W), ``W`` (K, C, FH, FW), pad p)
------------------------------------------------------------------------
**Forward.** Each image is copied, once, into a *padded plane* per channel:
``in_h x in_w = (H + 2p) x (W + 2p)``, zeros around, rows contiguous. The
output is computed on the *grid*: ``out_h`` rows of ``in_w`` positions, laid out
flat, so that grid position ``q = oh * in_w + ow`` reads input position
``q + kh * in_w + kw`` of every plane: consecutive outputs read consecutive
inputs for every tap, and a vector of ``lanes`` outputs is one unaligned load.
The last ``in_w - out_w`` positions of each grid row are computed and thrown
away. A register tile holds ``k_tile`` output channels x ``vectors`` vectors of
grid positions; for each (c, kh, kw) it loads ``vectors`` input vectors and does
``k_tile * vectors`` fused multiply-adds with a weight broadcast to all lanes.
Accumulators start from the bias. Weights are packed as
``(k_blocks, C, FH, FW, k_tile)`` (zero rows pad K to ``k_blocks * k_tile``):
``pack_forward_weights``. The grid of one block of output channels is written to thread scratch and
its valid ``out_w`` positions per row copied into the NCHW output.

The padded planes of the whole batch are kept (``packed_input``): they are the
backward's private copy of ``x``, so the caller may change ``x`` after forward.

**Backward-data** is the forward tile run on ``dout`` padded by
``FH - 1 - p`` (rows) and ``FW - 1 - p`` (columns), with the weights transposed
(channels in <-> out) and flipped: ``pack_backward_data_weights``. Its grid has
``H`` rows of ``out_w + 2 (FW - 1 - p)`` positions.

With a single input channel, dx is computed from dout vectors instead (see
``ConvPlan.one_channel_data``).

**Backward-weights** keeps vectors over output channels instead: ``dout`` of an
image is transposed into ``(w_blocks, out_h * out_w, lanes)`` (channels padded
with zeros to ``w_blocks * lanes``), and for one (block of lanes output channels,
``c_tile`` input channels, kh, kw) a tile of ``c_tile`` accumulators, one per
input channel, adds ``dout_vector(pixel) * x(c, pixel + tap)`` over all pixels
of the image. With 32 vector registers and more than one block of output
channels (``pair_blocks``), two blocks go through each tile at once, so that
each x value loaded feeds two multiply-adds; their tiles then hold at most
``PAIR_CHANNELS`` input channels (every sum is the same). The accumulators of a
group of images live in the group's own
``(w_blocks, C, FH, FW, lanes)`` buffer; ``channel_tiles`` cuts C into tiles
of the sizes the kernels are compiled for, at most ``weight_tile_rows`` each. db is summed in float64 per group
from the same pass.

Threads and determinism
-----------------------
Forward runs one task per image; backward one task per image group. Threads
take tasks dynamically (an atomic counter), so whichever thread runs a task,
its arithmetic is the same. Backward splits the batch into
``groups = min(N, DW_GROUPS)`` fixed groups of consecutive images
(``group_bounds``); each group sums its images in order into its own buffer,
then the groups are added in order 0, 1, ... Results are therefore identical,
bit for bit, for every thread count. ``forward_threads(most)``,
``backward_threads(most)`` and ``backward_data_threads(most)`` are the threads
worth waking for a pass (``fastconv._threads.threads_for``: one per task and
per least work at most).

Variants
--------
``VARIANTS`` are the instruction sets the kernels are compiled for, best first;
``LANES[variant][dtype]`` the elements of one vector register,
``REGISTERS[variant]`` how many vector registers the tiles may fill (for "generic", 32 on
AArch64 and 16 elsewhere, as the portable kernels are compiled).
``FORWARD_TILES[registers]`` and ``CHANNEL_TILES[registers]`` list the register
tiles compiled for that many registers; the plan picks the forward tile with the
least padded work times ``TILE_COST``.

Public names (stable): ``VARIANTS``, ``VECTOR_BYTES``, ``LANES``, ``REGISTERS``, ``FORWARD_TILES``,
``TILE_COST``, ``PIXEL_TILES``, ``PIXEL_TILE_COST``, ``CHANNEL_TILES``, ``PAIR_CHANNELS``, ``DW_GROUPS``, ``output_size``, ``direct_supported``,
``conv_plan``, ``ConvPlan``, ``BackwardBuffers``, ``TilePass``, ``group_bounds``, ``channel_tiles``,
``pack_forward_weights``, ``pack_backward_data_weights``.
"""
import functools
import platform
import sys
import sysconfig
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from fastconv._checks import output_size  # the one output-size formula  # noqa: F401
from fastconv._threads import threads_for

VARIANTS = ("avx512", "avx2", "generic")

VECTOR_BYTES = {"avx512": 64, "avx2": 32, "generic": 16}

LANES = {variant: {np.dtype(np.float32): size // 4, np.dtype(np.float64): size // 8}
         for variant, size in VECTOR_BYTES.items()}


def _portable_registers(machine, pointer_bits):
    """The vector registers of the portable variant on ``machine``: 32 on 64-bit ARM (AArch64's NEON), 16
    elsewhere (x86-64's SSE2, 32-bit ARM), as ``dconv_generic.c`` chooses them (``__aarch64__``)."""
    return 32 if pointer_bits == 64 and machine.lower() in ("aarch64", "arm64") else 16


# The machine this Python runs as; on Windows sysconfig's platform ("win-amd64", "win-arm64"), because there
# platform.machine() names the processor even to an x86-64 Python emulated on ARM64.
_MACHINE = sysconfig.get_platform().rsplit("-", 1)[-1] if sys.platform == "win32" else platform.machine()

REGISTERS = {"avx512": 32, "avx2": 16, "generic": _portable_registers(_MACHINE, 64 if sys.maxsize > 2 ** 32 else 32)}

# (output channels, vectors of grid positions): accumulators + input vectors + one broadcast fit the registers
FORWARD_TILES = {32: ((16, 1), (12, 2), (8, 3), (8, 2), (6, 4), (4, 6), (1, 12)),
                 16: ((8, 1), (6, 2), (4, 2), (2, 4), (1, 6))}

# (vectors of output channels, pixels) of the tiles with the output channels in the lanes: accumulators +
# weight vectors + one broadcast fit the registers
PIXEL_TILES = {32: ((4, 6), (3, 8), (2, 12)), 16: ((2, 6),)}

# Time per multiply-add of each forward tile relative to 8 x 3 (measured with AVX-512 in float32, data in
# cache, on the chapter-8 network's image widths): tiles with about as many loads (input vectors, weight
# broadcasts) as multiply-adds are slowed down by them. The 16-register tiles are estimated the same way
# from their loads per multiply-add.
TILE_COST = {(16, 1): 1.27, (12, 2): 1.06, (8, 3): 1.0, (8, 2): 1.11, (6, 4): 1.02, (4, 6): 1.06, (1, 12): 1.3,
             (8, 1): 1.38, (6, 2): 1.25, (4, 2): 1.3, (2, 4): 1.38, (1, 6): 1.65}
# the same for the channels-in-lanes tiles, keyed ("pixels", vectors of channels, pixels); their results
# are transposed into the NCHW output afterwards, which is counted in
PIXEL_TILE_COST = {("pixels", 4, 6): 1.1, ("pixels", 3, 8): 1.1, ("pixels", 2, 12): 1.2, ("pixels", 2, 6): 1.35}

# the channels-in-lanes tile takes as many input channels at a time as have this many bytes of weights
L1_WEIGHT_BYTES = 16384

# input channels of one backward-weights tile (one accumulator each, plus the dout vector), largest first
CHANNEL_TILES = {32: (16, 8, 4, 2, 1), 16: (8, 4, 2, 1)}

# input channels of a backward-weights tile at most when two blocks of output channels share it (two
# accumulators per channel)
PAIR_CHANNELS = 8

# dW and db are summed over this many fixed groups of images (fewer for smaller batches); it is also the
# most threads backward can use
DW_GROUPS = 16


def direct_supported(filter_h, filter_w, stride, pad):
    """Whether the direct kernels handle this geometry (stride 1, pad at most the filter size - 1)."""
    return stride == 1 and pad <= filter_h - 1 and pad <= filter_w - 1


def group_bounds(batch, groups):
    """Images [first, end) of each of ``groups`` groups of consecutive images, in order."""
    return [(g * batch // groups, (g + 1) * batch // groups) for g in range(groups)]


def channel_tiles(channels, registers, most=None):
    """(first channel, count) tiles covering ``channels``, each count one of CHANNEL_TILES[registers] and at
    most ``most``."""
    tiles, first = [], 0
    for size in CHANNEL_TILES[registers]:
        if most is not None and size > most:
            continue
        while channels - first >= size:
            tiles.append((first, size))
            first += size
    return tuple(tiles)


@dataclass(frozen=True)
class TilePass:
    """One run of the forward tile: ``in_channels`` padded planes to ``out_channels`` grids.

    A source plane of ``src_h x src_w`` values is placed at offset
    (``border_h``, ``border_w``) of a zeroed ``in_h x in_w`` plane; planes follow
    each other every ``in_plane`` elements and ``in_tail`` more (zero) elements
    after the last one may be read, by grid positions that are thrown away
    (``image_stride`` elements per image in all). The grid
    has ``out_h`` rows of ``in_w`` positions (``grid``), of which the first
    ``out_w`` of each row are kept; it is computed in ``grid_tiles`` tiles of
    ``vectors * lanes`` positions (``grid_padded`` in all), for ``k_blocks``
    blocks of ``k_tile`` output channels (``k_padded`` in all).

    With ``channel_lanes`` the tile keeps output channels in the lanes instead:
    ``k_tile`` is a multiple of ``lanes`` and ``vectors`` counts output pixels
    (row-major over ``out_h x out_w``, no thrown-away positions); for each (c, kh,
    kw) the tile loads ``k_tile / lanes`` weight vectors and multiplies them by
    one input value per pixel. Input channels are taken ``c_chunk`` at a time
    over all pixels, so that the chunk's weights stay in the L1 cache, the
    sums carried in scratch between chunks (the same additions in the same
    order). A block's results, ``(pixels, k_tile)``, are transposed into the
    output. The plan takes it where the grid would waste
    many lanes (small planes, whose rows are short against the padding).
    """

    in_channels: int
    out_channels: int
    src_h: int
    src_w: int
    border_h: int
    border_w: int
    in_h: int
    in_w: int
    out_h: int
    out_w: int
    lanes: int
    k_tile: int
    vectors: int
    channel_lanes: bool = False
    c_chunk: int = 1


    @property
    def in_plane(self):
        return self.in_h * self.in_w

    @property
    def grid(self):
        return self.out_h * self.in_w

    @property
    def grid_tiles(self):
        if self.channel_lanes:
            return -(-self.out_h * self.out_w // self.vectors)
        return -(-self.grid // (self.vectors * self.lanes))

    @property
    def grid_padded(self):
        """Results per output channel in scratch (the channels-in-lanes tile: one per pixel of its tiles)."""
        if self.channel_lanes:
            return self.grid_tiles * self.vectors
        return self.grid_tiles * self.vectors * self.lanes

    @property
    def in_tail(self):
        if self.channel_lanes:  # reads valid input positions only
            return 0
        # the last tile's loads reach grid_padded - grid + FW - 1 elements past the planes (FW - 1 = in_w - out_w)
        return self.grid_padded - self.grid + max(self.lanes, self.in_w - self.out_w)

    @property
    def k_blocks(self):
        return -(-self.out_channels // self.k_tile)

    @property
    def k_padded(self):
        return self.k_blocks * self.k_tile

    @property
    def image_elements(self):
        """Padded planes of one image."""
        return self.in_channels * self.in_plane

    @property
    def image_stride(self):
        """Elements from one image's padded planes to the next: the planes and the tail they may read."""
        return self.image_elements + self.in_tail

    @property
    def grid_elements(self):
        """The output grid of one block of output channels of one image."""
        return self.k_tile * self.grid_padded


def _tile_pass(in_channels, out_channels, src_h, src_w, border_h, border_w, filter_h, filter_w, lanes, registers,
               itemsize):
    in_h, in_w = src_h + 2 * border_h, src_w + 2 * border_w
    out_h = in_h - filter_h + 1
    out_w = in_w - filter_w + 1
    grid, pixels = out_h * in_w, out_h * out_w

    def cost(tile):
        k_tile, vectors, channel_lanes = tile
        if channel_lanes:
            positions = -(-pixels // vectors) * vectors
            factor = PIXEL_TILE_COST["pixels", k_tile // lanes, vectors]
        else:
            positions = -(-grid // (vectors * lanes)) * vectors * lanes
            factor = TILE_COST[k_tile, vectors]
        channels = -(-out_channels // k_tile) * k_tile
        return channels * positions * factor, -k_tile * vectors, -k_tile  # ties: the larger tile

    tiles = [(k_tile, vectors, False) for k_tile, vectors in FORWARD_TILES[registers]]
    tiles += [(k_vectors * lanes, pixels_, True) for k_vectors, pixels_ in PIXEL_TILES[registers]]
    k_tile, vectors, channel_lanes = min(tiles, key=cost)
    c_chunk = max(1, L1_WEIGHT_BYTES // (filter_h * filter_w * k_tile * itemsize)) if channel_lanes else in_channels
    return TilePass(in_channels, out_channels, src_h, src_w, border_h, border_w, in_h, in_w, out_h, out_w,
                    lanes, k_tile, vectors, channel_lanes, min(c_chunk, in_channels))


class BackwardBuffers(NamedTuple):
    """Sizes in elements of the parts of a thread's backward scratch (``ConvPlan.backward_buffers``)."""

    transposed: int
    planes: int
    grid: int
    masked: int


@dataclass(frozen=True)
class ConvPlan:
    """Everything the direct kernels need for one convolution (see the module docstring).

    ``direct`` is False when the direct kernels do not apply (stride > 1, pad
    of the filter size or more); the backend then uses its general path and
    the other fields are not meaningful.
    """

    batch: int
    channels: int
    height: int
    width: int
    filters: int
    filter_h: int
    filter_w: int
    stride: int
    pad: int
    out_h: int
    out_w: int
    dtype: np.dtype
    variant: str
    lanes: int
    registers: int
    direct: bool
    forward: TilePass = None
    backward_data: TilePass = None
    channel_tiles: tuple = ()
    groups: int = 0
    pair_blocks: bool = False

    @property
    def one_channel_data(self):
        """Whether dx comes from dout vectors rather than the backward-data tile: for one input channel.

        With a single input channel (a network's first layer) the backward-data tile would
        have one output channel and do one multiply-add per load. Instead the dout of an
        image is transposed into blocks with a zero border (``dt_rows x dt_cols`` vectors
        of ``lanes`` output channels, ``dt_block`` elements per block of lanes channels,
        the last ``lanes`` vectors spare); dW and db are taken from their interior, and
        each dx value is the sum over taps of dout vectors times weight vectors (the
        forward weights packed with ``k_tile = lanes``), whose lanes are then added.
        """
        return self.direct and self.channels == 1

    @property
    def dt_rows(self):
        return self.out_h + 2 * (self.filter_h - 1 - self.pad)

    @property
    def dt_cols(self):
        return self.out_w + 2 * (self.filter_w - 1 - self.pad)

    @property
    def dt_block(self):
        return (self.dt_rows * self.dt_cols + self.lanes) * self.lanes

    @property
    def w_blocks(self):
        """Blocks of ``lanes`` output channels in backward-weights."""
        return -(-self.filters // self.lanes)

    @property
    def weight_tile_rows(self):
        """Most rows of one backward-weights tile: input channels (``channel_tiles`` are cut to it), or for
        one input channel the filter taps of a tile (each tap one accumulator); ``PAIR_CHANNELS`` where two
        blocks share the tile, else twice that (a 3 x 3 filter's 9 taps in one tile)."""
        return PAIR_CHANNELS if self.pair_blocks else 2 * PAIR_CHANNELS

    @property
    def packed_input(self):
        """Elements of the batch's padded planes, kept from forward for backward."""
        return self.batch * self.forward.image_stride

    @property
    def forward_scratch(self):
        """Elements of thread scratch for forward: one image's output grid, then (when no backward
        follows) its padded planes and (when only its pooled output is wanted) its output."""
        return self.forward.grid_elements + self.forward.image_stride + self.filters * self.out_h * self.out_w

    @property
    def backward_buffers(self):
        """Elements of each part of a thread's scratch for backward, in order: ``transposed`` dout (for one
        input channel, its bordered blocks, masked as it is transposed), the dx pass's padded dout
        ``planes`` and its ``grid``, and one image's dout with a fused ReLU's mask applied (``masked``);
        for one input channel only the first."""
        if self.one_channel_data:
            return BackwardBuffers(self.w_blocks * self.dt_block, 0, 0, 0)
        bd = self.backward_data
        return BackwardBuffers(self.w_blocks * self.out_h * self.out_w * self.lanes, bd.image_stride,
                               bd.grid_elements, self.filters * self.out_h * self.out_w)

    @property
    def backward_scratch(self):
        """Elements of thread scratch for backward: the sum of ``backward_buffers``."""
        return sum(self.backward_buffers)

    @property
    def dw_group_elements(self):
        """Elements of one group's dW sums, ``(w_blocks, C, FH, FW, lanes)``."""
        return self.w_blocks * self.channels * self.filter_h * self.filter_w * self.lanes

    def forward_threads(self, most=None):
        """Threads for forward: one task per image."""
        return threads_for(self.batch, self.batch * self.forward.grid_elements, "conv", most)

    def backward_threads(self, most=None):
        """Threads for backward-weights (and dx where it is computed in the same pass): one task per group."""
        return threads_for(self.groups, self.batch * self.filters * self.out_h * self.out_w, "conv", most)

    def backward_data_threads(self, most=None):
        """Threads for a backward-data pass of its own: one task per image."""
        return threads_for(self.batch, self.batch * self.backward_data.grid_elements, "conv", most)


def conv_plan(x_shape, w_shape, stride, pad, dtype, variant):
    """The plan for convolving ``x_shape`` (N, C, H, W) with ``w_shape`` (K, C, FH, FW) on ``variant``.

    Plans are immutable and remembered: the same arguments return the same plan.
    """
    return _conv_plan(tuple(int(s) for s in x_shape), tuple(int(s) for s in w_shape), int(stride), int(pad),
                      np.dtype(dtype), variant)


@functools.lru_cache(maxsize=256)
def _conv_plan(x_shape, w_shape, stride, pad, dtype, variant):
    N, C, H, W = x_shape
    K, _, FH, FW = w_shape
    lanes = LANES[variant][dtype]
    registers = REGISTERS[variant]
    out_h = output_size(H, FH, stride, pad, "height")
    out_w = output_size(W, FW, stride, pad, "width")
    common = dict(batch=N, channels=C, height=H, width=W, filters=K, filter_h=FH, filter_w=FW, stride=stride,
                  pad=pad, out_h=out_h, out_w=out_w, dtype=dtype, variant=variant, lanes=lanes, registers=registers)
    if not direct_supported(FH, FW, stride, pad):
        return ConvPlan(direct=False, **common)
    forward = _tile_pass(C, K, H, W, pad, pad, FH, FW, lanes, registers, dtype.itemsize)
    backward_data = _tile_pass(K, C, out_h, out_w, FH - 1 - pad, FW - 1 - pad, FH, FW, lanes, registers,
                               dtype.itemsize)
    pair_blocks = registers >= 32 and -(-K // lanes) > 1
    return ConvPlan(direct=True, forward=forward, backward_data=backward_data,
                    channel_tiles=channel_tiles(C, registers, PAIR_CHANNELS if pair_blocks else None),
                    groups=min(N, DW_GROUPS), pair_blocks=pair_blocks, **common)


def _pack(weights, k_tile):
    """(K, C, FH, FW) weights as (k_blocks, C, FH, FW, k_tile), zero rows padding K."""
    K = weights.shape[0]
    blocks = -(-K // k_tile)
    padded = np.zeros((blocks * k_tile,) + weights.shape[1:], dtype=weights.dtype)
    padded[:K] = weights
    return np.ascontiguousarray(padded.reshape((blocks, k_tile) + weights.shape[1:]).transpose(0, 2, 3, 4, 1))


def pack_forward_weights(plan, weights):
    """Weights (K, C, FH, FW) in the forward tile's layout ``(k_blocks, C, FH, FW, k_tile)``."""
    return _pack(weights, plan.forward.k_tile)


def pack_backward_data_weights(plan, weights):
    """Weights transposed (C <-> K) and flipped (FH, FW), in the backward-data tile's layout."""
    return _pack(weights.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1], plan.backward_data.k_tile)
