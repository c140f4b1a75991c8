"""Device code of the Triton backend: the design MACs and one loop per shape (GEMM, implicit-GEMM convolution,
its input and weight gradients).

Every kernel takes the same design constexprs (:func:`mbmlib.kernels.triton.launch.design_constexprs`):
``MAC`` picks the multiply-accumulate at compile time (float words: Mitchell, MBM or L-Mul; integer words:
Mitchell, MBM, a table gather or DRUM), ``ACC`` the accumulator (float32, or int32/int64 for exact integer
sums), and the rest are the design's constants.  A MAC the kernel is not compiled for costs nothing.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["MAC_IDS", "ACC_IDS", "KERNELS"]

# Fixed-point constants of SPEC.md section 1, as compile-time constants of the kernels.
_ONE = tl.constexpr(1 << 23)  # 1.0 in 23-bit fixed point
_TWO = tl.constexpr(1 << 24)  # 2.0
_BIAS = tl.constexpr(0x3F800000)  # bits of 1.0f: mantissa field + _BIAS = bits of 1 + x
_ULP = tl.constexpr(2.0**-23)  # G * 2**-23 is exact in float32 (G has at most 24 significant bits)

# The MACs (value of the MAC constexpr): float words first, then integer words (see launch.encode).
MAC_IDS = {("float", "mitchell"): 0, ("float", "mbm"): 1, ("float", "lmul"): 2, ("int", "mitchell"): 3,
           ("int", "mbm"): 4, ("int", "table"): 5, ("int", "drum"): 6}
_F_MBM = tl.constexpr(1)
_F_LMUL = tl.constexpr(2)
_I_MITCHELL = tl.constexpr(3)
_I_MBM = tl.constexpr(4)
_I_TABLE = tl.constexpr(5)
_I_DRUM = tl.constexpr(6)
ACC_IDS = {"float32": 0, "int32": 1, "int64": 2}


# --------------------------------------------------------------------------- the MACs

@triton.jit
def _rz_float(m):
    """float32(m) rounded toward zero (one cvt.rz instruction): m & ~(m >> 24) for m < 2**25."""
    return tl.inline_asm_elementwise("cvt.rz.f32.s32 $0, $1;", "=r,r", [m], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _one_plus(x, C0: tl.constexpr, RZ: tl.constexpr):
    """2**-23 * trunc24(2**23 * (1 + x1 + x2) + C0) (float32) from x = mant_a + mant_b + _BIAS, the sum below 2**25:
    at 2 or more its lowest bit is dropped, as the normalising shift truncates it (SPEC rule 6)."""
    m = x + (_ONE + C0 - _BIAS)
    if RZ:
        g = _rz_float(m)
    else:
        g = (m & ~(m >> 24)).to(tl.float32)
    return g * _ULP


@triton.jit
def _significand(x, MAC: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr):
    """F = G * 2**-23 (float32) from x = mant_a + mant_b + _BIAS: the same G as the registry's significand
    (mbmlib.multipliers.designs) of Mitchell, MBM or L-Mul (mantissas cut to n bits, C0 = 2**(23 - l))."""
    if MAC == _F_MBM:
        carry = x >= _BIAS + _ONE  # x1 + x2 >= 1
        f1 = tl.where(x < _BIAS + _TWO - C1, x + C1, x).to(tl.float32, bitcast=True)  # corner case: no correction
        f = tl.where(carry, f1, _one_plus(x, C0, RZ))  # no carry: 1 + x1 + x2 + c, maybe >= 2: truncated
    elif MAC == _F_LMUL:
        f = _one_plus(x, C0, RZ)  # 1 + xA + xB + 2**-l, halved (truncating) at 2 or more
    else:
        f = x.to(tl.float32, bitcast=True)  # Mitchell: 1 + x1 + x2, or 2 (x1 + x2) after a carry
    return f


@triton.jit
def _rank1(acc, wa, wb, MAC: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr):
    """Float words: acc (BLOCK_N, BLOCK_M) += product(a, b) for one k: wa (BLOCK_M,) words of A, wb (BLOCK_N,) of B
    (biased)."""
    sa = wa.to(tl.int32).to(tl.float32, bitcast=True)[None, :]  # low half: scale bits
    sb = wb.to(tl.int32).to(tl.float32, bitcast=True)[:, None]
    x = (wa >> 32).to(tl.int32)[None, :] + (wb >> 32).to(tl.int32)[:, None]  # (BLOCK_N, BLOCK_M)
    return acc + (sa * sb) * _significand(x, MAC, C0, C1, RZ)  # same order of rounding as the reference


@triton.jit
def _program_tile(g_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(group or batch index as int64, rows, columns) of this program's output tile."""
    g = (tl.program_id(2) + g_offset).to(tl.int64)
    return g, tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _int_mac(acc, wa, wb, table_ptr, TABLE: tl.constexpr, BITS: tl.constexpr, IS_MBM: tl.constexpr,
             C0: tl.constexpr, C1: tl.constexpr, WIDE: tl.constexpr):
    """acc (BLOCK_N, BLOCK_M) += sign(a*b) * P(|a|, |b|) for one k, from words of int_words (SPEC section 4).

    Formula designs: G from the summed mantissa fields as the registry's significand computes it, then
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
def _drum_mac(acc, wa, wb, WIDE: tl.constexpr):
    """acc (BLOCK_N, BLOCK_M) += a * b for one k, from DRUM's words (int_words): each its signed reduced operand
    sign * A', so the product is exact; in int32 (|P| < 2**30 up to 15 bits), in int64 (``WIDE``) at 16 bits."""
    if WIDE:
        p = wa.to(tl.int32).to(tl.int64)[None, :] * wb.to(tl.int32).to(tl.int64)[:, None]  # one mul.wide.s32
    else:
        p = wa.to(tl.int32)[None, :] * wb.to(tl.int32)[:, None]
    return acc + p.to(acc.dtype)


@triton.jit
def _mac(acc, wa, wb, table_ptr, MAC: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr,
         BITS: tl.constexpr, WIDE: tl.constexpr):
    """acc (BLOCK_N, BLOCK_M) += product(a, b) for one k, by the design's MAC (chosen at compile time)."""
    if MAC < _I_MITCHELL:
        acc = _rank1(acc, wa, wb, MAC, C0, C1, RZ)
    elif MAC == _I_DRUM:
        acc = _drum_mac(acc, wa, wb, WIDE)
    else:
        acc = _int_mac(acc, wa, wb, table_ptr, MAC == _I_TABLE, BITS, MAC == _I_MBM, C0, C1, WIDE)
    return acc


@triton.jit
def _acc_zero(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """A zero (BLOCK_N, BLOCK_M) accumulator: float32 (ACC 0), or int32 (1) / int64 (2) for exact integer sums."""
    if ACC == 0:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    elif ACC == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int64)
    return acc


# --------------------------------------------------------------------------- batched GEMM, K-major

@triton.jit(do_not_specialize=["stride_ak"])  # an unknown row stride keeps A's loads scalar, in the acc layout
def _gemm_kernel(
    a_ptr, b_ptr, out_ptr, table_ptr,  # words of A (G, K, Mp), of B (G, K, Np), K-major; output; table (or unused)
    M, N, K, g_offset,
    stride_ag, stride_ak, stride_bg, stride_bk,
    stride_og, stride_om, stride_on,
    MAC: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr, BITS: tl.constexpr, WIDE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[g, m, n] = sum_k product(a[g, m, k], b[g, n, k])."""
    g, offs_m, offs_n = _program_tile(g_offset, BLOCK_M, BLOCK_N)
    pa = a_ptr + g * stride_ag + offs_m  # M and N are padded to the tile: no masks in the K loop
    pb = b_ptr + g * stride_bg + offs_n
    acc = _acc_zero(BLOCK_M, BLOCK_N, ACC)
    for _ in range(K):
        acc = _mac(acc, tl.load(pa), tl.load(pb), table_ptr, MAC, C0, C1, RZ, BITS, WIDE)
        pa += stride_ak
        pb += stride_bk
    o_off = g * stride_og + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


# --------------------------------------------------------------------------- implicit-GEMM convolution

@triton.jit
def _conv2d_kernel(
    x_ptr, w_ptr, out_ptr, table_ptr,  # words of x (B, C, H, W); of w, K-major (G, KH, KW, Cg, Np); output
    M, N, Cg, H, W, Ho, Wo, g_offset,  # M = B*Ho*Wo, N = O // groups
    stride_xb, stride_xc, stride_xh, stride_xw, stride_wg, stride_wk, stride_ob, stride_oc,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    MAC: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr, BITS: tl.constexpr, WIDE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[b, o, oh, ow] = sum over (i, j, c) of product(x[b, c, ih, iw], w[o, c, i, j]), padding masked."""
    grp, offs_m, offs_n = _program_tile(g_offset, BLOCK_M, BLOCK_N)
    b, r, ih0, iw0 = _conv_rows(offs_m, Ho, Wo, conv_sh, conv_sw, pad_h, pad_w)
    x_rows = x_ptr + b.to(tl.int64) * stride_xb + grp * Cg * stride_xc
    w_cols = w_ptr + grp * stride_wg + offs_n  # weights (i, j, c)-major, output channel contiguous
    acc = _acc_zero(BLOCK_M, BLOCK_N, ACC)
    for t in range(KH * KW):  # kernel taps: a loop, not unrolled, so no tap's pointers stay live in another
        px, pw, inside = _conv_tap(x_rows, w_cols, ih0, iw0, t // KW, t % KW, offs_m, M, H, W, Cg, KW, dil_h, dil_w,
                                   stride_xh, stride_xw, stride_wk)
        for _ in range(Cg):  # the K loop: input channels at this kernel offset
            acc = _mac(acc, tl.load(px, mask=inside, other=0), tl.load(pw), table_ptr, MAC, C0, C1, RZ, BITS, WIDE)
            px += stride_xc
            pw += stride_wk
    _store_conv_tile(out_ptr, acc.to(out_ptr.dtype.element_ty), b, r, offs_m, offs_n, grp, M, N, stride_ob,
                     stride_oc)


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
    g_ptr, w_ptr, out_ptr, table_ptr,  # words of grad (B, O, Ho, Wo); of w, K-major (G, KH, KW, Og, Np); grad_x (B, C, H, W)
    M, N, Og, H, W, Ho, Wo, g_offset,  # M = B*H*W, N = C // groups
    stride_gb, stride_go, stride_gh, stride_gw, stride_wg, stride_wk, stride_ob, stride_oc,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, NONFINITE_W: tl.constexpr,
    MAC: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr, BITS: tl.constexpr, WIDE: tl.constexpr,
    ACC: tl.constexpr,
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
    acc = _acc_zero(BLOCK_M, BLOCK_N, ACC)
    for t in range(KH * KW):  # kernel taps: a loop, not unrolled (as in _conv2d_kernel)
        th = th0 - (t // KW) * dil_h  # = oh * conv_sh for the output position that read (h, w) through (i, j)
        tw = tw0 - (t % KW) * dil_w
        oh = tl.maximum(th, 0) // conv_sh
        ow = tl.maximum(tw, 0) // conv_sw
        hit = ((offs_m < M) & (th >= 0) & (tw >= 0) & (oh * conv_sh == th) & (ow * conv_sw == tw)
               & (oh < Ho) & (ow < Wo))
        pg = g_rows + oh * stride_gh + ow * stride_gw
        pw = w_cols + t * Og * stride_wk
        for _ in range(Og):  # the K loop: output channels of the group
            new = _mac(acc, tl.load(pg, mask=hit, other=0), tl.load(pw), table_ptr, MAC, C0, C1, RZ, BITS, WIDE)
            # A miss has no product at all (0 * inf would be NaN): kept out, when w has infinities or NaN.
            acc = tl.where(hit[None, :], new, acc) if NONFINITE_W else new
            pg += stride_go
            pw += stride_wk
    _store_conv_tile(out_ptr, acc, offs_m // (H * W), offs_m % (H * W), offs_m, offs_n, grp, M, N, stride_ob,
                     stride_oc)


# As _gemm_kernel's stride_ak: an unknown step keeps grad's loads scalar, in the acc layout.  Specialised (a launch
# passes a multiple of 16), the K loop converted layouts through shared memory or warp shuffles (bench --sass).
@triton.jit(do_not_specialize=["stride_gp"])
def _conv2d_grad_weight_kernel(
    g_ptr, x_ptr, out_ptr, table_ptr,  # words of grad, channels last (B, Ho, Wo, G, Mp); of x, zero-padded (B, C, Hp, Wp)
    M, N, KHW, Ho, Wo, b_per, n_batch, n_groups,  # M = O // groups, N = Cg*KH*KW; b_per images a program
    stride_gb, stride_gp, stride_gg, stride_xb, stride_xc, stride_xh, stride_xw, stride_os, stride_og,
    conv_sh, conv_sw, dil_h, dil_w,
    KW: tl.constexpr,
    MAC: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, RZ: tl.constexpr, BITS: tl.constexpr, WIDE: tl.constexpr,
    ACC: tl.constexpr,
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
    acc = _acc_zero(BLOCK_M, BLOCK_N, ACC)
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
                acc = _mac(acc, tl.load(pg), tl.load(px), table_ptr, MAC, C0, C1, RZ, BITS, WIDE)
                pg += stride_gp
                px += conv_sw * stride_xw
            pg_r += Wo * stride_gp
            px_r += conv_sh * stride_xh
        pg_b += stride_gb
        px_b += stride_xb
    o_off = split * stride_os + grp * stride_og + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    tl.store(out_ptr + o_off, acc, mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


# Report name -> (kernel, its shape constexprs for SeedNet's 3 x 3 convolutions): what bench --sass compiles.
KERNELS = {
    "gemm": (_gemm_kernel, {}),
    "conv2d": (_conv2d_kernel, {"KH": 3, "KW": 3}),
    "conv2d_grad_input": (_conv2d_grad_input_kernel, {"KH": 3, "KW": 3, "NONFINITE_W": False}),
    "conv2d_grad_weight": (_conv2d_grad_weight_kernel, {"KW": 3}),
}
