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
  conversion on CUDA (``RZ``), ``m & ~(m >> 24)`` then an exact conversion in the interpreter.

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
mantissa field or magnitude high): the product from the integer formula or one gather
from the table, summed exactly in int32 where no sum can overflow it, else int64.
If a kernel fails to compile or launch on the user's GPU, the call warns once and
runs the ``compiled`` backend instead.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import NamedTuple

try:
    import triton
    import triton.language as tl
except ImportError as err:  # the backend picker (mbmlib.kernels.default_backend) catches this
    raise ImportError(
        "mbmlib's 'triton' backend needs the 'triton' package (installed with CUDA builds of PyTorch "
        f"on Linux, or 'pip install triton'): {err}"
    ) from err

import torch

from ..multipliers.floating import check_float_tensors, split_operand
from ..multipliers.integer import int_fields
from ..multipliers.specs import Multiplier
from .lowering import check_int_gemm, output_size

name = "triton"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # decided once: triton reads it at decoration time

_MAX_GRID_Z = 65535  # CUDA limit on grid axes 1 and 2; more groups / batches are launched in chunks

# Fixed-point constants of SPEC.md section 1, as compile-time constants of the kernels.
_ONE = tl.constexpr(1 << 23)  # 1.0 in 23-bit fixed point
_TWO = tl.constexpr(1 << 24)  # 2.0
_BIAS = tl.constexpr(0x3F800000)  # bits of 1.0f: mantissa field + _BIAS = bits of 1 + x
_ULP = tl.constexpr(2.0**-23)  # G * 2**-23 is exact in float32 (G has at most 24 significant bits)
BIAS = 0x3F800000  # host copy of _BIAS, added to the words of the N-side operand


# --------------------------------------------------------------------------- tile configurations

class Tile(NamedTuple):
    """An output tile of BLOCK_N x BLOCK_M: TN x TM per thread, TM = BLOCK_M / (32 * num_warps) rows along the lanes."""
    block_m: int
    block_n: int
    num_warps: int

    @property
    def tm(self) -> int:
        return max(1, self.block_m // (32 * self.num_warps))

    @property
    def tn(self) -> int:
        return self.block_n

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps, "num_stages": 1}


# Tiles the host picks from (see pick_tile).  8 x 4 / 8 x 8 a thread keep 0.4 or fewer loads per MAC;
# 4 x 4 and one warp serve small problems (linear layers of a small batch, grad_w of a first layer).
TILES = (Tile(1024, 4, 4), Tile(512, 8, 2), Tile(256, 8, 2), Tile(256, 4, 1), Tile(128, 4, 1))
DEFAULT_TILE = TILES[0]
_INTERPRET_TILE = Tile(16, 4, 1)  # under the interpreter: a few, partly padded tiles on the tests' shapes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pick_tile(m: int, n: int, tiles=TILES) -> Tile:
    """The tile for an (m, n) output: least padded work, a little penalty for thin tiles, then the largest."""
    def cost(t: Tile):
        padded = _cdiv(m, t.block_m) * t.block_m * _cdiv(n, t.block_n) * t.block_n
        return padded * (1.0 + 0.5 / t.tm + 0.5 / t.tn), -t.block_m * t.block_n

    return min(tiles, key=cost)


def _tile_for(m: int, n: int, tile: Tile | None) -> Tile:
    """The caller's tile (tests), the interpreter's small one, or pick_tile's."""
    return tile or (_INTERPRET_TILE if INTERPRET else pick_tile(m, n))


# --------------------------------------------------------------------------- device helpers

@triton.jit
def _rz_float(m):
    """float32(m) rounded toward zero (one cvt.rz instruction): m & ~(m >> 24) for m < 2**25."""
    return tl.inline_asm_elementwise("cvt.rz.f32.s32 $0, $1;", "=r,r", [m], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _significand(x, IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr):
    """F = G * 2**-23 (float32) from x = mant_a + mant_b + _BIAS: the same G as mantissa_product."""
    if IS_MBM:
        carry = x >= _BIAS + _ONE  # x1 + x2 >= 1
        f1 = tl.where(x < _BIAS + _TWO - C1, x + C1, x).to(tl.float32, bitcast=True)  # corner case: no correction
        m0 = x + (_ONE + C0 - _BIAS)  # no carry: 2**23 * (1 + x1 + x2 + c), maybe >= 2: truncated
        if RZ:
            g0 = _rz_float(m0)
        else:
            g0 = (m0 & ~(m0 >> 24)).to(tl.float32)
        f = tl.where(carry, f1, g0 * _ULP)
    else:
        f = x.to(tl.float32, bitcast=True)  # Mitchell: 1 + x1 + x2, or 2 (x1 + x2) after a carry
    return f


@triton.jit
def _rank1(acc, wa, wb, IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr):
    """acc (BLOCK_N, BLOCK_M) += product(a, b) for one k: wa (BLOCK_M,) words of A, wb (BLOCK_N,) of B (biased)."""
    sa = wa.to(tl.int32).to(tl.float32, bitcast=True)[None, :]  # low half: scale bits
    sb = wb.to(tl.int32).to(tl.float32, bitcast=True)[:, None]
    x = (wa >> 32).to(tl.int32)[None, :] + (wb >> 32).to(tl.int32)[:, None]  # (BLOCK_N, BLOCK_M)
    return acc + (sa * sb) * _significand(x, IS_MBM, C0, C1, RZ)  # same order of rounding as the reference


@triton.jit
def _program_tile(g_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(group or batch index as int64, rows, columns) of this program's output tile."""
    g = (tl.program_id(2) + g_offset).to(tl.int64)
    return g, tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)


# --------------------------------------------------------------------------- batched GEMM, K-major

@triton.jit(do_not_specialize=["stride_ak"])  # an unknown row stride keeps A's loads scalar, in the acc layout
def _gemm_kernel(
    a_ptr, b_ptr, out_ptr,  # words of A (G, K, Mp), of B (G, K, Np), K-major; output
    M, N, K, g_offset,
    stride_ag, stride_ak, stride_bg, stride_bk,
    stride_og, stride_om, stride_on,
    IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    g, offs_m, offs_n = _program_tile(g_offset, BLOCK_M, BLOCK_N)
    pa = a_ptr + g * stride_ag + offs_m  # M and N are padded to the tile: no masks in the K loop
    pb = b_ptr + g * stride_bg + offs_n
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in range(K):
        acc = _rank1(acc, tl.load(pa), tl.load(pb), IS_MBM, C0, C1, RZ)
        pa += stride_ak
        pb += stride_bk
    o_off = g * stride_og + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptr + o_off, acc, mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


# --------------------------------------------------------------------------- implicit-GEMM convolution

@triton.jit
def _conv2d_kernel(
    x_ptr, w_ptr, out_ptr,  # words of x (B, C, H, W); of w, K-major (G, KH, KW, Cg, Np); output (B, O, Ho, Wo)
    M, N, Cg, H, W, Ho, Wo, g_offset,  # M = B*Ho*Wo, N = O // groups
    stride_xb, stride_xc, stride_xh, stride_xw, stride_wg, stride_wk, stride_ob, stride_oc,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[b, o, oh, ow] = sum over (i, j, c) of approx(x[b, c, ih, iw], w[o, c, i, j]), padding masked."""
    grp, offs_m, offs_n = _program_tile(g_offset, BLOCK_M, BLOCK_N)
    b, r, ih0, iw0 = _conv_rows(offs_m, Ho, Wo, conv_sh, conv_sw, pad_h, pad_w)
    x_rows = x_ptr + b.to(tl.int64) * stride_xb + grp * Cg * stride_xc
    w_cols = w_ptr + grp * stride_wg + offs_n  # weights (i, j, c)-major, output channel contiguous
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            px, pw, inside = _conv_tap(x_rows, w_cols, ih0, iw0, i, j, offs_m, M, H, W, Cg, KW, dil_h, dil_w,
                                       stride_xh, stride_xw, stride_wk)
            for _ in range(Cg):  # the K loop: input channels at this kernel offset
                acc = _rank1(acc, tl.load(px, mask=inside, other=0), tl.load(pw), IS_MBM, C0, C1, RZ)
                px += stride_xc
                pw += stride_wk
    _store_conv_tile(out_ptr, acc, b, r, offs_m, offs_n, grp, M, N, stride_ob, stride_oc)


@triton.jit
def _conv_rows(offs_m, Ho, Wo, conv_sh, conv_sw, pad_h, pad_w):
    """(b, oh * Wo + ow, top input row, left input column) of GEMM rows m = (b, oh, ow).

    Decoded once per tile; consecutive m are neighbouring output columns, so input loads run along M.
    """
    b = offs_m // (Ho * Wo)
    r = offs_m % (Ho * Wo)
    return b, r, (r // Wo) * conv_sh - pad_h, (r % Wo) * conv_sw - pad_w


@triton.jit
def _conv_tap(x_rows, w_cols, ih0, iw0, i, j, offs_m, M, H, W, Cg, KW, dil_h, dil_w,
              stride_xh, stride_xw, stride_wk):
    """Pointers to the input (per row) and weight (per column) words of kernel tap (i, j), channel 0, and the
    mask of rows that read inside the image: padding and rows past M load the word 0 (a zero operand)."""
    ih = ih0 + i * dil_h
    iw = iw0 + j * dil_w
    inside = (offs_m < M) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return x_rows + ih * stride_xh + iw * stride_xw, w_cols + (i * KW + j) * Cg * stride_wk, inside


@triton.jit
def _store_conv_tile(out_ptr, acc, b, r, offs_m, offs_n, grp, M, N, stride_ob, stride_oc):
    """Store an (N, M) tile of a convolution's output (B, O, ...) at rows (b, r) and channels grp * N + n."""
    o_off = (b.to(tl.int64) * stride_ob + r)[None, :] + ((grp * N + offs_n) * stride_oc)[:, None]
    tl.store(out_ptr + o_off, acc, mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


# --------------------------------------------------------------------------- convolution gradients

@triton.jit
def _conv2d_grad_input_kernel(
    g_ptr, w_ptr, out_ptr,  # words of grad (B, O, Ho, Wo); of w, K-major (G, KH, KW, Og, Np); grad_x (B, C, H, W)
    M, N, Og, H, W, Ho, Wo, g_offset,  # M = B*H*W, N = C // groups
    stride_gb, stride_go, stride_gh, stride_gw, stride_wg, stride_wk, stride_ob, stride_oc,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, NONFINITE_W: tl.constexpr,
    IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Transposed convolution: grad_x[b, c, h, w] = sum over (i, j, o) of approx(grad[b, o, oh, ow], w[o, c, i, j])."""
    grp, offs_m, offs_n = _program_tile(g_offset, BLOCK_M, BLOCK_N)
    b = offs_m // (H * W)
    r = offs_m % (H * W)  # h * W + w: input position receiving the gradient
    th0 = r // W + pad_h
    tw0 = r % W + pad_w
    g_rows = g_ptr + b.to(tl.int64) * stride_gb + grp * Og * stride_go
    w_cols = w_ptr + grp * stride_wg + offs_n
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            th = th0 - i * dil_h  # = oh * conv_sh for the output position that read (h, w) through (i, j)
            tw = tw0 - j * dil_w
            oh = tl.maximum(th, 0) // conv_sh
            ow = tl.maximum(tw, 0) // conv_sw
            hit = ((offs_m < M) & (th >= 0) & (tw >= 0) & (oh * conv_sh == th) & (ow * conv_sw == tw)
                   & (oh < Ho) & (ow < Wo))
            pg = g_rows + oh * stride_gh + ow * stride_gw
            pw = w_cols + (i * KW + j) * Og * stride_wk
            for _ in range(Og):  # the K loop: output channels of the group
                new = _rank1(acc, tl.load(pg, mask=hit, other=0), tl.load(pw), IS_MBM, C0, C1, RZ)
                # A miss has no product at all (0 * inf would be NaN): kept out, when w has infinities or NaN.
                acc = tl.where(hit[None, :], new, acc) if NONFINITE_W else new
                pg += stride_go
                pw += stride_wk
    _store_conv_tile(out_ptr, acc, b, r, offs_m, offs_n, grp, M, N, stride_ob, stride_oc)


@triton.jit
def _conv2d_grad_weight_kernel(
    g_ptr, x_ptr, out_ptr,  # words of grad, channels last (B, Ho, Wo, G, Mp); of x, zero-padded (B, C, Hp, Wp)
    M, N, KHW, Ho, Wo, b_per, n_batch, n_groups,  # M = O // groups, N = Cg*KH*KW; b_per images a program
    stride_gb, stride_gp, stride_gg, stride_xb, stride_xc, stride_xh, stride_xw, stride_os, stride_og,
    conv_sh, conv_sw, dil_h, dil_w,
    KW: tl.constexpr,
    IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial grad_w[o, (c, i, j)] = sum over b in this program's images, oh, ow of approx(grad, x_pad)."""
    pid_z = tl.program_id(2)  # (batch split, group)
    split = pid_z // n_groups
    grp = (pid_z % n_groups).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = tl.minimum(offs_n, N - 1)  # padded columns read a real column and are never stored
    c = n_ok // KHW
    ij = n_ok % KHW
    x_cols = x_ptr + (grp * (N // KHW) + c) * stride_xc + (ij // KW) * dil_h * stride_xh + (ij % KW) * dil_w * stride_xw
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    b0 = split * b_per
    pg_b = g_ptr + grp * stride_gg + offs_m + b0.to(tl.int64) * stride_gb  # pointers are 64-bit
    px_b = x_cols + b0.to(tl.int64) * stride_xb
    for _ in range(b0, tl.minimum(b0 + b_per, n_batch)):
        pg_r = pg_b
        px_r = px_b
        for _ in range(Ho):
            pg = pg_r
            px = px_r
            for _ in range(Wo):  # the K loop: output columns of this row
                acc = _rank1(acc, tl.load(pg), tl.load(px), IS_MBM, C0, C1, RZ)
                pg += stride_gp
                px += conv_sw * stride_xw
            pg_r += Wo * stride_gp
            px_r += conv_sh * stride_xh
        pg_b += stride_gb
        px_b += stride_xb
    o_off = split * stride_os + grp * stride_og + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    tl.store(out_ptr + o_off, acc, mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


# --------------------------------------------------------------------------- integer and table multipliers

@triton.jit
def _int_mac(acc, wa, wb, table_ptr, TABLE: tl.constexpr, BITS: tl.constexpr, IS_MBM: tl.constexpr,
             C0: tl.constexpr, C1: tl.constexpr, WIDE: tl.constexpr):
    """acc (BLOCK_N, BLOCK_M) += sign(a*b) * P(|a|, |b|) for one k, from words of int_words (SPEC section 4).

    Formula designs: G from the summed mantissa fields as mantissa_product computes it, then
    P = G >> (23 - k1 - k2), the shift from the A word's 23 - k1 and the B word's k2 (one
    subtraction; in int64 with a left shift where k1 + k2 > 23); tables: one gather.  The
    sign fields (-1, 0, 1; 0 for a zero operand or a padded word) multiply the product once.
    """
    la = wa.to(tl.int32)  # low half: sign << 8 | (23 - k1) for A, sign << 8 | k2 for B
    lb = wb.to(tl.int32)
    sign = (la >> 8)[None, :] * (lb >> 8)[:, None]
    ma = (wa >> 32).to(tl.int32)[None, :]  # high half: 23-bit mantissa field, or the magnitude
    mb = (wb >> 32).to(tl.int32)[:, None]
    if TABLE:
        p = tl.load(table_ptr + ((ma << BITS) + mb))
    else:
        s = ma + mb
        if IS_MBM:
            m0 = s + (_ONE + C0)  # no carry: 1 + x1 + x2 + c, maybe >= 2: truncated
            t1 = s + C1  # carry: 2 * (x1 + x2 + c/2), no correction in the corner case
            g = tl.where(s >= _ONE, tl.where(t1 < _TWO, t1, s) << 1, m0 & ~(m0 >> 24))
        else:
            g = tl.where(s >= _ONE, s << 1, s + _ONE)
        r = (la & 0xFF)[None, :] - (lb & 0xFF)[:, None]  # 23 - k1 - k2
        if WIDE:
            g64 = g.to(tl.int64)
            p = tl.where(r >= 0, g64 >> tl.maximum(r, 0).to(tl.int64), g64 << tl.maximum(-r, 0).to(tl.int64))
        else:
            p = g >> r  # k1 + k2 <= 22: a right shift of 1 to 23 bits
    return acc + (p * sign.to(p.dtype)).to(acc.dtype)  # |P| < 2**31 unless WIDE: the signed product fits p


@triton.jit
def _int_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC64: tl.constexpr):
    """A zero (BLOCK_N, BLOCK_M) accumulator: int32 where every sum fits, else int64."""
    if ACC64:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    return acc


@triton.jit(do_not_specialize=["stride_ak"])
def _gemm_int_kernel(
    a_ptr, b_ptr, out_ptr, table_ptr,  # words of A (G, K, Mp), of B (G, K, Np), K-major; int64 output; table
    M, N, K, g_offset,
    stride_ag, stride_ak, stride_bg, stride_bk,
    stride_og, stride_om, stride_on,
    TABLE: tl.constexpr, BITS: tl.constexpr, IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
    WIDE: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Integer GEMM, the loop of _gemm_kernel with exact integer sums."""
    g, offs_m, offs_n = _program_tile(g_offset, BLOCK_M, BLOCK_N)
    pa = a_ptr + g * stride_ag + offs_m  # M and N are padded to the tile with word 0: no masks in the K loop
    pb = b_ptr + g * stride_bg + offs_n
    acc = _int_acc(BLOCK_M, BLOCK_N, ACC64)
    for _ in range(K):
        acc = _int_mac(acc, tl.load(pa), tl.load(pb), table_ptr, TABLE, BITS, IS_MBM, C0, C1, WIDE)
        pa += stride_ak
        pb += stride_bk
    o_off = g * stride_og + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptr + o_off, acc.to(tl.int64), mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


@triton.jit
def _conv2d_int_kernel(
    x_ptr, w_ptr, out_ptr, table_ptr,  # words of x (B, C, H, W); of w, K-major (G, KH, KW, Cg, Np); int64 output
    M, N, Cg, H, W, Ho, Wo, g_offset,  # M = B*Ho*Wo, N = O // groups
    stride_xb, stride_xc, stride_xh, stride_xw, stride_wg, stride_wk, stride_ob, stride_oc,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    TABLE: tl.constexpr, BITS: tl.constexpr, IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
    WIDE: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Integer implicit-GEMM convolution, the loop of _conv2d_kernel with exact integer sums."""
    grp, offs_m, offs_n = _program_tile(g_offset, BLOCK_M, BLOCK_N)
    b, r, ih0, iw0 = _conv_rows(offs_m, Ho, Wo, conv_sh, conv_sw, pad_h, pad_w)
    x_rows = x_ptr + b.to(tl.int64) * stride_xb + grp * Cg * stride_xc
    w_cols = w_ptr + grp * stride_wg + offs_n
    acc = _int_acc(BLOCK_M, BLOCK_N, ACC64)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            px, pw, inside = _conv_tap(x_rows, w_cols, ih0, iw0, i, j, offs_m, M, H, W, Cg, KW, dil_h, dil_w,
                                       stride_xh, stride_xw, stride_wk)
            for _ in range(Cg):
                acc = _int_mac(acc, tl.load(px, mask=inside, other=0), tl.load(pw), table_ptr, TABLE, BITS,
                               IS_MBM, C0, C1, WIDE)
                px += stride_xc
                pw += stride_wk
    _store_conv_tile(out_ptr, acc.to(tl.int64), b, r, offs_m, offs_n, grp, M, N, stride_ob, stride_oc)


# --------------------------------------------------------------------------- host: operands

def _check_tensors(op: str, **tensors: torch.Tensor) -> torch.device:
    """The layers' tensor check, then what the kernels add: float32, on CUDA unless under the interpreter."""
    for name, t in tensors.items():
        if getattr(t, "dtype", None) != torch.float32:
            raise TypeError(f"triton.{op} takes float32 tensors; {name} is {getattr(t, 'dtype', type(t).__name__)}")
    return _kernel_device(check_float_tensors(tensors, f"triton.{op}"))


def _kernel_device(device: torch.device) -> torch.device:
    """``device`` if the kernels can run there: CUDA, or the CPU under the interpreter; a one-line error otherwise."""
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the triton backend needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                         "before importing it to run the kernels on the CPU (slow, for testing)")
    return device


def kind_args(multiplier: Multiplier) -> dict:
    """The kernels' multiplier constexprs and compile options (also used by mbmlib.workflow.sass)."""
    if multiplier.is_exact:
        raise ValueError("the 'exact' multiplier has no approximate kernel; mbmlib.functional runs torch's own ops "
                         "for it")
    c0, c1 = multiplier.corrections
    # enable_fp_fusion=False: no FMA contraction, so every product is rounded on its own exactly as in
    # the reference before it is summed.  RZ: the cvt.rz instruction exists on CUDA, not in the interpreter.
    return {"IS_MBM": _mac(multiplier) == "mbm", "C0": c0, "C1": c1, "RZ": not INTERPRET, "enable_fp_fusion": False}


def words(x: torch.Tensor, multiplier: Multiplier, bias: int = 0) -> torch.Tensor:
    """int64 words of x's fields, same shape: scale bits low, (mantissa + bias) high; +0 is the word 0."""
    scale, mant = split_operand(x, multiplier)
    low = scale.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((mant.to(torch.int64) + bias) << 32) | low


def _pad_last(t: torch.Tensor, block: int) -> torch.Tensor:
    """t with its last axis zero-padded to a multiple of ``block`` (word 0 = +0), contiguous."""
    n = t.shape[-1]
    out = t.new_zeros(*t.shape[:-1], _cdiv(n, block) * block)
    out[..., :n] = t
    return out


def _z_chunks(n: int):
    """(start, count) chunks of a grid axis limited to 65535 programs."""
    for start in range(0, n, _MAX_GRID_Z):
        yield start, min(_MAX_GRID_Z, n - start)


# --------------------------------------------------------------------------- host: fallback

_FALLBACK = "compiled"
_FAILED: dict[str, str] = {}  # kernel name -> why it failed on this machine (then never tried again)


def _gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (sm_{''.join(map(str, torch.cuda.get_device_capability(device)))})"
    return "the CPU (Triton interpreter)"


def _guarded(op: str, device: torch.device, launch, args: tuple, fallback_args: tuple):
    """Run ``launch(*args)``; if the Triton kernel fails to compile or launch, warn once and use ``compiled``."""
    if op not in _FAILED:
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                return launch(*args)
        except Exception as err:  # any compiler / driver error: the run must go on
            _FAILED[op] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"mbmlib: the Triton kernel for {op} failed on {_gpu_name(device)} ({_FAILED[op][:300]}); "
                f"using the '{_FALLBACK}' backend instead from now on. To choose a backend yourself pass "
                f"backend='compiled' (or 'reference') or set the environment variable MBMLIB_BACKEND=compiled.",
                RuntimeWarning, stacklevel=3)
    from . import load  # the package's loader; imported here, it imports this module

    return getattr(load(_FALLBACK), op)(*fallback_args)


# --------------------------------------------------------------------------- host: batched GEMM

def bmm_nt(a: torch.Tensor, b: torch.Tensor, multiplier: Multiplier, *, _tile: Tile | None = None) -> torch.Tensor:
    """Batched approximate ``a @ b.T``: a (G, M, K), b (G, N, K) -> (G, M, N), float32 sums.  Any strides."""
    device = _check_tensors("bmm_nt", a=a, b=b)
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"triton.bmm_nt expects a (G, M, K) and b (G, N, K), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    G, M, K = a.shape
    N = b.shape[1]
    kind = kind_args(multiplier)
    out = torch.empty(G, M, N, dtype=torch.float32, device=device)
    if out.numel() == 0 or K == 0:
        return out.zero_()
    return _guarded("bmm_nt", device, _bmm_nt_launch, (a, b, multiplier, kind, out, _tile), (a, b, multiplier))


def _bmm_nt_launch(a, b, multiplier, kind, out, tile):
    """Lanes run along the longer of M and N (the other operand is the broadcast one): a swap if N > M."""
    swap = b.shape[1] > a.shape[1]
    rows, cols = (b, a) if swap else (a, b)
    G, M, K = rows.shape
    N = cols.shape[1]
    tile = _tile_for(M, N, tile)
    wa = _pad_last(words(rows, multiplier).transpose(1, 2), tile.block_m)  # (G, K, Mp), K-major
    wb = _pad_last(words(cols, multiplier, BIAS).transpose(1, 2), tile.block_n)  # (G, K, Np)
    stride_om, stride_on = out.stride()[1:] if not swap else out.stride()[:0:-1]
    for g0, ng in _z_chunks(G):
        _gemm_kernel[(_cdiv(M, tile.block_m), _cdiv(N, tile.block_n), ng)](
            wa, wb, out, M, N, K, g0, wa.stride(0), wa.stride(1), wb.stride(0), wb.stride(1),
            out.stride(0), stride_om, stride_on, **kind, **tile.meta())
    return out


# --------------------------------------------------------------------------- host: convolution

def _check_conv(op, x, w, stride, padding, dilation, groups):
    """(B, C, H, W), (O, Cg, KH, KW) and (Ho, Wo) of a valid convolution, or a one-line error."""
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"triton.{op} expects x (B, C, H, W) and w (O, C/groups, kh, kw), got "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    B, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    if groups < 1 or C % groups or O % groups or Cg != C // groups:
        raise ValueError(f"triton.{op}: {C} input channels, {O} output channels and weight {tuple(w.shape)} "
                         f"do not fit groups={groups}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"triton.{op}: invalid stride {stride}, padding {padding} or dilation {dilation}")
    Ho, Wo = output_size((H, W), (KH, KW), stride, padding, dilation)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"triton.{op}: kernel {KH}x{KW} (dilation {dilation}) is larger than the padded "
                         f"input {H + 2 * padding[0]}x{W + 2 * padding[1]}")
    return (B, C, H, W), (O, Cg, KH, KW), (Ho, Wo)


def _conv_args(stride, padding, dilation):
    return (*stride, *padding, *dilation)


def _kmajor_weights(ww, groups, block, channels_out: bool):
    """Weight words (O, Cg, KH, KW) K-major: (G, KH, KW, Cg, Np) [o contiguous] or (G, KH, KW, Og, Np) [c contiguous]."""
    O, Cg, KH, KW = ww.shape
    ww = ww.view(groups, O // groups, Cg, KH, KW)
    ww = ww.permute(0, 3, 4, 2, 1) if channels_out else ww.permute(0, 3, 4, 1, 2)
    return _pad_last(ww, block)


def conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
           multiplier: Multiplier, *, _tile: Tile | None = None) -> torch.Tensor:
    """Approximate 2-D convolution as an implicit GEMM: x (B, C, H, W), w (O, C/groups, kh, kw) -> (B, O, Ho, Wo).

    ``padding`` is explicit and symmetric (zeros).  No im2col is materialised: the kernel derives
    input coordinates from the GEMM indices and masks the padding.
    """
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)  # pairs, checked by functional
    device = _check_tensors("conv2d", x=x, w=w)
    (B, C, H, W), (O, Cg, KH, KW), (Ho, Wo) = _check_conv("conv2d", x, w, stride, padding, dilation, groups)
    kind = kind_args(multiplier)
    out = torch.empty(B, O, Ho, Wo, dtype=torch.float32, device=device)
    if out.numel() == 0 or Cg * KH * KW == 0:
        return out.zero_()
    args = (x, w, stride, padding, dilation, groups, multiplier)
    return _guarded("conv2d", device, _conv2d_launch, args + (kind, out, _tile), args)


def _conv2d_launch(x, w, stride, padding, dilation, groups, multiplier, kind, out, tile):
    B, O, Ho, Wo = out.shape
    Cg, KH, KW = w.shape[1:]
    M, N = B * Ho * Wo, O // groups
    tile = _tile_for(M, N, tile)
    wx = words(x.contiguous(), multiplier)  # (B, C, H, W)
    ww = _kmajor_weights(words(w, multiplier, BIAS), groups, tile.block_n, channels_out=True)  # (G, KH, KW, Cg, Np)
    for g0, ng in _z_chunks(groups):
        _conv2d_kernel[(_cdiv(M, tile.block_m), _cdiv(N, tile.block_n), ng)](
            wx, ww, out, M, N, Cg, x.shape[2], x.shape[3], Ho, Wo, g0,
            *wx.stride(), ww.stride(0), ww.stride(3), out.stride(0), out.stride(1),
            *_conv_args(stride, padding, dilation), KH=KH, KW=KW, **kind, **tile.meta())
    return out


# --------------------------------------------------------------------------- host: convolution gradients

def conv2d_grads(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
                 multiplier: Multiplier, *, _tile: Tile | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_w) of an approximate convolution, every gradient product approximate, no im2col / col2im.

    grad (B, O, Ho, Wo), x (B, C, H, W), w (O, C/groups, kh, kw), float32.  grad_x sums
    approx(grad, w) over (i, j, o) (a transposed convolution); grad_w sums approx(grad, x) over
    (b, oh, ow), the batch split across programs and the partial sums added afterwards.
    """
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    device = _check_tensors("conv2d_grads", grad=grad, x=x, w=w)
    _, _, out_hw = _check_conv("conv2d_grads", x, w, stride, padding, dilation, groups)
    if grad.shape != (x.shape[0], w.shape[0], *out_hw):
        raise ValueError(f"triton.conv2d_grads: grad has shape {tuple(grad.shape)}, the convolution's output "
                         f"is {(x.shape[0], w.shape[0], *out_hw)}")
    kind = kind_args(multiplier)
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=device)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=device)
    if grad.numel() == 0 or x.numel() == 0 or w.numel() == 0:
        return grad_x, grad_w
    args = (grad, x, w, stride, padding, dilation, groups, multiplier)
    return _guarded("conv2d_grads", device, _conv2d_grads_launch, args + (kind, grad_x, grad_w, _tile), args)


def _conv2d_grads_launch(grad, x, w, stride, padding, dilation, groups, multiplier, kind, grad_x, grad_w, tile):
    wg = words(grad.contiguous(), multiplier)  # (B, O, Ho, Wo)
    _grad_input_launch(wg, w, stride, padding, dilation, groups, multiplier, kind, grad_x, tile)
    grad_w.copy_(_grad_weight_launch(wg, x, w.shape, stride, padding, dilation, groups, multiplier, kind, tile))
    return grad_x, grad_w


def _grad_input_launch(wg, w, stride, padding, dilation, groups, multiplier, kind, grad_x, tile):
    B, C, H, W = grad_x.shape
    O, Cg, KH, KW = w.shape
    M, N = B * H * W, Cg
    tile = _tile_for(M, N, tile)
    ww = _kmajor_weights(words(w, multiplier, BIAS), groups, tile.block_n, channels_out=False)  # (G, KH, KW, Og, Np)
    for g0, ng in _z_chunks(groups):
        _conv2d_grad_input_kernel[(_cdiv(M, tile.block_m), _cdiv(N, tile.block_n), ng)](
            wg, ww, grad_x, M, N, O // groups, H, W, wg.shape[2], wg.shape[3], g0,
            *wg.stride(), ww.stride(0), ww.stride(3), grad_x.stride(0), grad_x.stride(1),
            *_conv_args(stride, padding, dilation), KH=KH, KW=KW,
            NONFINITE_W=not bool(torch.isfinite(w).all()), **kind, **tile.meta())


def _batch_splits(n_batch: int, programs: int) -> int:
    """How many parts the batch of a grad_w reduction is split into: enough programs to fill a large GPU."""
    if INTERPRET:
        return min(n_batch, 2)
    return max(1, min(n_batch, _MAX_GRID_Z, 1024 // max(1, programs)))


def _grad_weight_launch(wg, x, w_shape, stride, padding, dilation, groups, multiplier, kind, tile):
    B, O, Ho, Wo = wg.shape
    _, Cg, KH, KW = w_shape
    M, N = O // groups, Cg * KH * KW
    if groups > _MAX_GRID_Z:
        raise ValueError(f"triton.conv2d_grads supports at most {_MAX_GRID_Z} groups, got {groups}")
    tile = _tile_for(M, N, tile)
    gl = _pad_last(wg.view(B, groups, M, Ho, Wo).permute(0, 3, 4, 1, 2), tile.block_m)  # (B, Ho, Wo, G, Mp)
    xp = torch.nn.functional.pad(words(x.contiguous(), multiplier, BIAS),
                                 (padding[1], padding[1], padding[0], padding[0]))  # (B, C, Hp, Wp), word 0 = +0
    grid_mn = (_cdiv(M, tile.block_m), _cdiv(N, tile.block_n))
    splits = max(1, min(_batch_splits(B, grid_mn[0] * grid_mn[1] * groups), _MAX_GRID_Z // groups))
    b_per = _cdiv(B, splits)
    splits = _cdiv(B, b_per)
    part = torch.empty(splits, groups, M, N, dtype=torch.float32, device=wg.device)
    _conv2d_grad_weight_kernel[(*grid_mn, splits * groups)](
        gl, xp, part, M, N, KH * KW, Ho, Wo, b_per, B, groups,
        gl.stride(0), gl.stride(2), gl.stride(3), *xp.stride(), part.stride(0), part.stride(1),
        *stride, *dilation, KW=KW, **kind, **tile.meta())
    return part.sum(0).view(w_shape)  # (G, Og, Cg*KH*KW) -> (O, Cg, KH, KW)


# --------------------------------------------------------------------------- host: integer and table multipliers

def int_words(q: torch.Tensor, multiplier: Multiplier, m_side: bool) -> torch.Tensor:
    """int64 words of sign-magnitude integers for the integer kernels (see _int_mac).

    High half: the mantissa field (formula designs) or the magnitude (tables).  Low half:
    ``sign << 8`` plus, for formula designs, ``23 - k`` on the M side and ``k`` on the N side, so
    one subtraction gives the product's right shift.  The integer 0 has sign 0 (and k = 0), the
    padding the word 0: both give products 0.
    """
    f1, f2 = int_fields(q, multiplier)  # (sign * (k + 1), mantissa) or (sign, magnitude)
    sign = torch.sign(f1)
    low = sign << 8
    if multiplier.kind != "table":
        k = (f1.abs() - 1).clamp(min=0)
        low = low | (23 - k if m_side else k)
    return (f2.to(torch.int64) << 32) | (low.to(torch.int64) & 0xFFFFFFFF)


def _int_device(op: str, *tensors: torch.Tensor) -> torch.device:
    """The one device of the integer operands, checked as :func:`_kernel_device` does."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"triton.{op}: the operands are on different devices ({', '.join(map(str, devices))})")
    return _kernel_device(devices.pop())


@functools.lru_cache(maxsize=16)
def _table(multiplier: Multiplier, device: torch.device, transposed: bool) -> torch.Tensor:
    """A table multiplier's entries flattened (A-major, or B-major if ``transposed``): int32 where they fit.

    Cached, like :func:`mbmlib.multipliers.integer.flat_table`: a layer's every call reads the same table.
    """
    t = multiplier.table.t() if transposed else multiplier.table
    dtype = torch.int32 if int(t.max()) < 2**31 else torch.int64
    return t.contiguous().reshape(-1).to(device=device, dtype=dtype)


def int_kind_args(multiplier: Multiplier, k: int) -> dict:
    """The integer kernels' constexprs for sums of ``k`` products (also used by mbmlib.workflow.sass)."""
    if not multiplier.is_integer:
        raise TypeError(f"integer kernels need an integer or table multiplier such as 'mbm-int8', got "
                        f"{multiplier.name!r}")
    table = multiplier.kind == "table"
    largest = multiplier.max_product
    wide = not table and 2 * (multiplier.bits - 1) > 22  # k1 + k2 > 22: P needs a left shift, in int64
    c0, c1 = multiplier.corrections
    return {"TABLE": table, "BITS": multiplier.bits, "IS_MBM": _mac(multiplier) == "mbm", "C0": c0, "C1": c1,
            "WIDE": wide, "ACC64": wide or max(1, k) * largest >= 2**31}


def _mac(multiplier: Multiplier) -> str:
    """The multiplier's specialised MAC ("mbm", "mitchell", "table"); ValueError for a design without one."""
    if multiplier.mac is None:
        raise ValueError(f"the Triton kernels have no multiply-accumulate for {multiplier.name!r}; run it through "
                         "mbmlib.functional (mbmlib.kernels.route picks its generic path)")
    return multiplier.mac


def bmm_nt_int(qa: torch.Tensor, qb: torch.Tensor, multiplier: Multiplier, *,
               _tile: Tile | None = None) -> torch.Tensor:
    """Integer ``qa @ qb.T`` of sign-magnitude integers: (G, M, K), (G, N, K) -> (G, M, N) float64, exact sums."""
    check_int_gemm(qa, qb, multiplier)
    if qa.dim() != 3 or qb.dim() != 3 or qa.shape[0] != qb.shape[0] or qa.shape[2] != qb.shape[2]:
        raise ValueError(f"triton.bmm_nt_int expects qa (G, M, K) and qb (G, N, K), got {tuple(qa.shape)} and "
                         f"{tuple(qb.shape)}")
    device = _int_device("bmm_nt_int", qa, qb)
    out = torch.zeros(qa.shape[0], qa.shape[1], qb.shape[1], dtype=torch.int64, device=device)
    if out.numel() == 0 or qa.shape[2] == 0:
        return out.to(torch.float64)
    return _guarded("bmm_nt_int", device, _bmm_nt_int_launch, (qa, qb, multiplier, out, _tile),
                    (qa, qb, multiplier))


def _bmm_nt_int_launch(qa, qb, multiplier, out, tile):
    """As _bmm_nt_launch: lanes along the longer of M and N; a table is then read transposed."""
    swap = qb.shape[1] > qa.shape[1]
    rows, cols = (qb, qa) if swap else (qa, qb)
    G, M, K = rows.shape
    N = cols.shape[1]
    tile = _tile_for(M, N, tile)
    wa = _pad_last(int_words(rows, multiplier, True).transpose(1, 2), tile.block_m)  # (G, K, Mp), K-major
    wb = _pad_last(int_words(cols, multiplier, False).transpose(1, 2), tile.block_n)  # (G, K, Np)
    table = _table(multiplier, out.device, swap) if multiplier.kind == "table" else wa  # wa: an unused pointer
    stride_om, stride_on = out.stride()[1:] if not swap else out.stride()[:0:-1]
    for g0, ng in _z_chunks(G):
        _gemm_int_kernel[(_cdiv(M, tile.block_m), _cdiv(N, tile.block_n), ng)](
            wa, wb, out, table, M, N, K, g0, wa.stride(0), wa.stride(1), wb.stride(0), wb.stride(1),
            out.stride(0), stride_om, stride_on, **int_kind_args(multiplier, K), **tile.meta())
    return out.to(torch.float64)


def conv2d_int(qx: torch.Tensor, qw: torch.Tensor, stride, padding, dilation, groups: int,
               multiplier: Multiplier, *, _tile: Tile | None = None) -> torch.Tensor:
    """Integer convolution as an implicit GEMM: (B, C, H, W), (O, C/groups, kh, kw) -> (B, O, Ho, Wo) float64."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    check_int_gemm(qx, qw, multiplier, k=qw[0].numel())
    device = _int_device("conv2d_int", qx, qw)
    (B, C, H, W), (O, Cg, KH, KW), (Ho, Wo) = _check_conv("conv2d_int", qx, qw, stride, padding, dilation, groups)
    out = torch.zeros(B, O, Ho, Wo, dtype=torch.int64, device=device)
    if out.numel() == 0 or Cg * KH * KW == 0:
        return out.to(torch.float64)
    args = (qx, qw, stride, padding, dilation, groups, multiplier)
    return _guarded("conv2d_int", device, _conv2d_int_launch, args + (out, _tile), args)


def _conv2d_int_launch(qx, qw, stride, padding, dilation, groups, multiplier, out, tile):
    B, O, Ho, Wo = out.shape
    Cg, KH, KW = qw.shape[1:]
    M, N = B * Ho * Wo, O // groups
    tile = _tile_for(M, N, tile)
    wx = int_words(qx.contiguous(), multiplier, True)  # (B, C, H, W)
    ww = _kmajor_weights(int_words(qw.contiguous(), multiplier, False), groups, tile.block_n, channels_out=True)
    table = _table(multiplier, out.device, False) if multiplier.kind == "table" else wx  # wx: an unused pointer
    for g0, ng in _z_chunks(groups):
        _conv2d_int_kernel[(_cdiv(M, tile.block_m), _cdiv(N, tile.block_n), ng)](
            wx, ww, out, table, M, N, Cg, qx.shape[2], qx.shape[3], Ho, Wo, g0,
            *wx.stride(), ww.stride(0), ww.stride(3), out.stride(0), out.stride(1),
            *_conv_args(stride, padding, dilation), KH=KH, KW=KW, **int_kind_args(multiplier, Cg * KH * KW),
            **tile.meta())
    return out.to(torch.float64)
