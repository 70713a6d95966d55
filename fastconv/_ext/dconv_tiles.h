/* The register tiles the direct-convolution kernels are compiled for, by the number of vector registers
 * they may fill (32 or 16): the C statement of fastconv/_plan.py's FORWARD_TILES, PIXEL_TILES and
 * CHANNEL_TILES, in the same order (tests/test_cython_backend.py checks that they agree).
 *
 * Each list is an X-macro: FC_..._TILES_<registers>(X) calls X once per tile, so that one list both
 * instantiates the kernels and dispatches to them (dconv_forward.h, dconv_backward.h), and gives the
 * table _direct.pyx reads (dconv_dispatch.c). FC_TILES(LIST) is the list for the FC_REGS of the variant
 * being compiled.
 */
#ifndef FASTCONV_DCONV_TILES_H
#define FASTCONV_DCONV_TILES_H

/* Forward grid tiles: X(output channels, vectors of grid positions). */
#define FC_FORWARD_TILES_32(X) X(16, 1) X(12, 2) X(8, 3) X(8, 2) X(6, 4) X(4, 6) X(1, 12)
#define FC_FORWARD_TILES_16(X) X(8, 1) X(6, 2) X(4, 2) X(2, 4) X(1, 6)

/* Forward tiles with the output channels in the lanes: X(vectors of output channels, pixels). */
#define FC_PIXEL_TILES_32(X) X(4, 6) X(3, 8) X(2, 12)
#define FC_PIXEL_TILES_16(X) X(2, 6)

/* Backward-weights tiles: X(input channels, partial sums per accumulator, paired), largest first. A tile
   with paired = 1 is also compiled for two blocks of output channels at once (the plan's pair_blocks;
   its tiles then hold at most _plan.PAIR_CHANNELS channels). */
#define FC_CHANNEL_TILES_32(X) X(16, 1, 0) X(8, 1, 1) X(4, 2, 1) X(2, 4, 1) X(1, 8, 1)
#define FC_CHANNEL_TILES_16(X) X(8, 1, 0) X(4, 2, 0) X(2, 4, 0) X(1, 8, 0)

#define FC_TILES_GLUE_(a, b) a##b
#define FC_TILES_GLUE(a, b) FC_TILES_GLUE_(a, b)
/* FC_TILES(FORWARD): FC_FORWARD_TILES_32 or FC_FORWARD_TILES_16, after FC_REGS */
#define FC_TILES(LIST) FC_TILES_GLUE(FC_##LIST##_TILES_, FC_REGS)

/* FC_WHEN(flag, MACRO)(arguments): MACRO(arguments) where flag is 1, nothing where it is 0 */
#define FC_WHEN(flag, MACRO) FC_TILES_GLUE(FC_WHEN_, flag)(MACRO)
#define FC_WHEN_1(MACRO) MACRO
#define FC_WHEN_0(MACRO) FC_NOTHING
#define FC_NOTHING(...)

#endif
