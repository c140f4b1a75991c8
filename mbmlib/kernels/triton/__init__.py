"""Triton backend: rank-1-update approximate GEMM, convolution and convolution gradients (CUDA).

Every operand is split once per tensor, outside the kernels, into the float ``scale``
(``sign * 2**k``) and the int32 (truncated) mantissa field ``mant``
(:func:`mbmlib.multipliers.floating.split_operand`), and the two fields are packed into one
64-bit word (scale bits low, mantissa high), so one load brings both.  The words
of the operand broadcast along N also carry the float exponent bias ``0x3F800000``
in their mantissa, so the sum of two mantissa fields is at once the bit pattern of
the product's significand ``G * 2**-23`` in most cases (SPEC section 1 rules 4-6):

* Mitchell: ``bits(ma + mb + 0x3F800000)`` is ``G * 2**-23`` exactly (carry or not);
* MBM, carry: the same bits plus the halved correction (or none in the corner case);
* MBM, no carry: ``G = trunc24(mant sum + 1 + correction)``, a round-toward-zero int-to-float
  conversion on CUDA (``RZ``), ``m & ~(m >> 24)`` then an exact conversion in the interpreter;
* L-Mul: the same conversion of ``mant sum + 1 + 2**-l``, carry or not (its mantissas are cut to
  their top n bits when the words are made).

Each product is then ``(scale_a * scale_b) * F`` with ``F = G * 2**-23``, rounded exactly
as in the reference (FMA contraction is disabled).  ``tl.dot`` is never used:
approximate products cannot run on tensor cores.

Loop shape (all kernels): an output tile is (BLOCK_N, BLOCK_M), BLOCK_M = TM * 32 *
num_warps along the lanes, so every thread owns a TN x TM register tile
(BLOCK_N = TN); each step of the K loop loads one word per owned row and column
and does ``acc[n, m] += product(a[m, k], b[k, n])``: no shuffles, no shared memory.
GEMM operands are stored K-major and padded to the tile, so the GEMM K loop has
no masks; the convolution kernels mask input loads at the padding only.
Integer and table multipliers (SPEC section 4) run the same GEMM and implicit-GEMM
convolution loops on int64 words of their own (:func:`int_words`: sign and shift low,
mantissa field or magnitude high; DRUM's word is its signed reduced operand): the product
from the integer formula, one gather from the table or (DRUM) one exact multiply, summed
exactly in int32 where no sum can overflow it, else int64.
The MAC is a compile-time choice (``MAC``, a constexpr from the design's registry entry).
If a kernel fails to compile or launch on the user's GPU, the call warns once and
runs the ``compiled`` backend instead.

The package: :mod:`.device` (the MACs and the four loops, and ``KERNELS``, the table
``bench --sass`` compiles), :mod:`.tiles` (tile shapes and the host's pick), :mod:`.launch`
(operand encodings, one launcher per shape, the fallback).
"""
try:
    import triton  # checked here: the backend picker, mbmlib.kernels.default_backend, catches this
except ImportError as err:
    raise ImportError(
        "mbmlib's 'triton' backend needs the 'triton' package (installed with CUDA builds of PyTorch "
        f"on Linux, or 'pip install triton'): {err}"
    ) from err

from .device import ACC_IDS, KERNELS, MAC_IDS
from .launch import (BIAS, bmm_nt, bmm_nt_int, conv2d, conv2d_grads, conv2d_int, design_constexprs, encode, int_words,
                     name, words)
from .tiles import CONV_TILES, DEFAULT_TILE, INTERPRET, TILES, Tile, pick_tile

TRITON_VERSION = triton.__version__

__all__ = ["name", "TRITON_VERSION", "INTERPRET", "Tile", "TILES", "CONV_TILES", "DEFAULT_TILE", "pick_tile", "KERNELS", "MAC_IDS", "ACC_IDS", "BIAS",
           "words", "int_words", "encode", "design_constexprs", "bmm_nt", "bmm_nt_int", "conv2d", "conv2d_int",
           "conv2d_grads"]
