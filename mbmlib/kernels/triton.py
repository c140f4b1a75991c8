"""Triton backend: hand-tiled approximate GEMM and implicit-GEMM convolution kernels (CUDA).

Every operand is split once per tensor, outside the kernels, into the float
``scale`` (``sign * 2**k``) and the int32 (truncated) mantissa field ``mant``
(:func:`mbmlib.multipliers.split_operand`).  The inner loop then only does

    s = mant_a + mant_b;  G = integer formula of ``mantissa_product``;
    acc += (scale_a * scale_b) * (float(G) * 2**-23)

on a ``(BLOCK_M, BLOCK_N, BLOCK_K)`` broadcast tile reduced over K with
``tl.sum`` in registers (nothing of size M*N*K is stored).  FMA contraction is
disabled, so each product is rounded exactly as in the reference.  ``tl.dot`` is never used: approximate products cannot
run on tensor cores.  The multiplier kind and its two corrections are
``tl.constexpr``, so Mitchell and MBM (and each truncation's corrections)
compile to separate specialised kernels.

On CUDA the tile shape is autotuned per (M, N, K); under ``TRITON_INTERPRET=1``
(CPU testing; read once, at import) a single small tile is used, because the
interpreter would otherwise benchmark every configuration very slowly.
"""
from __future__ import annotations

import contextlib
import os

try:
    import triton
    import triton.language as tl
except ImportError as err:  # the backend picker (mbmlib.kernels.default_backend) catches this
    raise ImportError(
        "mbmlib's 'triton' backend needs the 'triton' package (installed with CUDA builds of PyTorch "
        f"on Linux, or 'pip install triton'): {err}"
    ) from err

import torch

from ..multipliers import Multiplier, split_operand
from .lowering import conv2d_grads_via_gemm, output_size

name = "triton"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # decided once: triton reads it at decoration time

_MAX_GRID_Y = 65535  # CUDA limit on grid axis 1 (the batch/group axis); larger batches go in chunks

# Fixed-point constants of SPEC.md section 1, as compile-time constants of the kernels.
_ONE = tl.constexpr(1 << 23)  # 1.0 in 23-bit fixed point
_TWO = tl.constexpr(1 << 24)  # 2.0
_ULP = tl.constexpr(2.0**-23)  # G * 2**-23 is exact in float32 (G has at most 24 significant bits)


# --------------------------------------------------------------------------- tile configurations

def _config(bm, bn, bk, warps, stages=2, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


if INTERPRET:
    # One small tile: the interpreter runs each program in numpy, so autotuning would only cost time.
    # 16 x 16 x 8 still gives several, partly masked tiles on the small shapes the tests use.
    _CONFIGS = [_config(16, 16, 8, warps=1, stages=1)]
else:
    # The 3-D product tile lives in registers, BLOCK_M * BLOCK_N * BLOCK_K / (32 * num_warps) products per
    # thread, so tiles stay at 8-32 K products: compiled ahead of time for sm_90 these use 130-255
    # registers a thread and do not spill (Triton's default layout spreads K over 4-8 lanes, so the
    # K reduction ends in a few warp shuffles per output).  A narrow-N tile serves depthwise / few-channel
    # convolutions, a short-K one first layers (K = C*kh*kw = 9).  Not yet tuned on real hardware.
    _CONFIGS = [
        _config(64, 64, 4, warps=4),
        _config(64, 32, 8, warps=4),
        _config(32, 64, 8, warps=4),
        _config(32, 32, 16, warps=4),
        _config(128, 64, 2, warps=8),
        _config(64, 64, 8, warps=8, stages=3),
        _config(128, 16, 8, warps=4),
        _config(256, 16, 4, warps=4),
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (e.g. BLOCK_N = 64 for a depthwise conv, N = 1)."""
    m, n, k = named_args["M"], named_args["N"], named_args["K"]

    def fits(c):
        kw = c.kwargs
        return (kw["BLOCK_M"] <= max(16, triton.next_power_of_2(m))
                and kw["BLOCK_N"] <= max(16, triton.next_power_of_2(n))
                and kw["BLOCK_K"] <= max(2, triton.next_power_of_2(k)))

    kept = [c for c in configs if fits(c)]
    if not kept:
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return kept


_PRUNE = None if INTERPRET else {"early_config_prune": _prune_configs}


# --------------------------------------------------------------------------- device helpers

@triton.jit
def _significand(s, IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr):
    """G (int32, < 2**25, <= 24 significant bits) from the mantissa sum s: same integers as mantissa_product."""
    carry = s >= _ONE
    if IS_MBM:
        m0 = s + (_ONE + C0)  # no carry: 1 + x1 + x2 + c, may reach 2
        g0 = m0 & ~(m0 >> 24)  # >= 2: clear the bit the truncating normalisation drops
        t1 = s + C1  # carry: 2 * (x1 + x2 + c/2) ...
        g1 = tl.where(t1 < _TWO, t1, s) << 1  # ... unless that overflows: skip the correction
        g = tl.where(carry, g1, g0)
    else:
        g = tl.where(carry, s << 1, s + _ONE)  # Mitchell: 2 (x1 + x2) after a carry, else 1 + x1 + x2
    return g


@triton.jit
def _load_fields(scale_ptr, mant_ptr, offsets, mask):
    """A tile of an operand's (scale, mantissa) fields; masked places load as the fields of +0."""
    return tl.load(scale_ptr + offsets, mask=mask, other=0.0), tl.load(mant_ptr + offsets, mask=mask, other=0)


@triton.jit
def _tile_sum(sa, ma, sb, mb, IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr):
    """sum_k product(a[m, k], b[n, k]) of a (BLOCK_M, BLOCK_K) and a (BLOCK_N, BLOCK_K) tile of fields.

    (BLOCK_M, BLOCK_N, BLOCK_K) broadcast with K last, the axis each tile was loaded along (no
    transpose; Triton still converts the small operand tiles into slices of the 3-D layout), reduced
    over K at once: nothing of size M*N*K leaves registers.  (Accumulating the 3-D tile and reducing
    after the loop, or putting K first so the sum stays within a thread, made the sm_90 code spill.)
    """
    s = ma[:, None, :] + mb[None, :, :]
    gsig = _significand(s, IS_MBM, C0, C1).to(tl.float32)
    p = (sa[:, None, :] * sb[None, :, :]) * (gsig * _ULP)  # same order of rounding as the reference
    return tl.sum(p, axis=2)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program; GROUP_M row-tiles are visited together so operand tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


# --------------------------------------------------------------------------- batched GEMM, NT layout

@triton.jit
def _bmm_nt_kernel(
    as_ptr, am_ptr, bs_ptr, bm_ptr, out_ptr,  # fields of a (scale, mant), of b, and the output
    M, N, K, g_offset,
    stride_ag, stride_am, stride_ak,  # a's fields (scale and mant share strides)
    stride_bg, stride_bn, stride_bk,  # b's fields
    stride_og, stride_om, stride_on,
    IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    g = (tl.program_id(1) + g_offset).to(tl.int64)  # int64 offsets: a batch may exceed 2**31 elements

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # Row bases, int64, computed once.  Both operands are (rows, K) with K the reduction axis: in the
    # usual NT layout K is the contiguous axis of a and of b, so each (BLOCK_M, BLOCK_K) / (BLOCK_N,
    # BLOCK_K) tile load is coalesced along its last axis (strides equal to 1 are specialised by triton).
    a_rows = g * stride_ag + offs_m.to(tl.int64)[:, None] * stride_am  # (BLOCK_M, 1)
    b_rows = g * stride_bg + offs_n.to(tl.int64)[:, None] * stride_bn  # (BLOCK_N, 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        a_off = a_rows + ks[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
        b_off = b_rows + ks[None, :] * stride_bk  # (BLOCK_N, BLOCK_K)
        a_mask = mask_m[:, None] & mask_k[None, :]
        b_mask = mask_n[:, None] & mask_k[None, :]
        # Masked elements load as scale 0, mantissa 0: their products are exactly 0 (both sides are masked
        # on K, so a 0 never meets an inf there); masked rows / columns are never stored.
        sa, ma = _load_fields(as_ptr, am_ptr, a_off, a_mask)
        sb, mb = _load_fields(bs_ptr, bm_ptr, b_off, b_mask)
        acc += _tile_sum(sa, ma, sb, mb, IS_MBM, C0, C1)

    # The output tile is stored row-major: N is the contiguous axis of the (G, M, N) result.
    o_off = g * stride_og + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptr + o_off, acc, mask=mask_m[:, None] & mask_n[None, :])


_bmm_nt_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "IS_MBM"],
                                prune_configs_by=_PRUNE)(_bmm_nt_kernel)


# --------------------------------------------------------------------------- implicit-GEMM convolution

@triton.jit
def _conv2d_kernel(
    xs_ptr, xm_ptr, ws_ptr, wm_ptr, out_ptr,  # fields of x (B, C, H, W), of w (O, Cg, KH, KW); output
    M, N, K, g_offset,  # M = B*Ho*Wo, N = O // groups, K = Cg*KH*KW (per group)
    Cg, H, W, Ho, Wo,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_ob, stride_oc,  # output (B, O, Ho, Wo): (Ho, Wo) contiguous, indexed by oh * Wo + ow
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    IS_MBM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    grp = (tl.program_id(1) + g_offset).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # GEMM row m = (b, oh, ow), decoded once per tile.  Consecutive m are consecutive output columns,
    # i.e. input columns conv_sw apart in NCHW: the x tile is loaded (nearly) coalesced along M.
    hw = Ho * Wo
    b = offs_m // hw
    r = offs_m % hw  # oh * Wo + ow
    ih0 = (r // Wo) * conv_sh - pad_h
    iw0 = (r % Wo) * conv_sw - pad_w
    x_rows = b.to(tl.int64) * stride_xb + (grp * Cg) * stride_xc  # (BLOCK_M,), int64
    # GEMM column n = output channel grp*N + n; its weights are one contiguous run of K values.
    w_rows = (grp * N + offs_n.to(tl.int64)) * stride_wo  # (BLOCK_N,)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # K is ordered (c, i, j), the natural order of the weight tensor (O, Cg, KH, KW): the weight tile
        # is coalesced along K, and KH, KW are constexpr so the decode is cheap shifts/multiplies.
        ks = k0 + offs_k
        mask_k = ks < K
        c = ks // (KH * KW)
        rk = ks % (KH * KW)
        i = rk // KW
        j = rk % KW
        ih = ih0[:, None] + (i * dil_h)[None, :]  # (BLOCK_M, BLOCK_K) input coordinates
        iw = iw0[:, None] + (j * dil_w)[None, :]
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_mask = mask_m[:, None] & mask_k[None, :] & inside
        x_off = x_rows[:, None] + (c * stride_xc)[None, :] + ih * stride_xh + iw * stride_xw
        w_off = w_rows[:, None] + (c * stride_wc + i * stride_wh + j * stride_ww)[None, :]
        w_mask = mask_n[:, None] & mask_k[None, :]
        # Padding positions load as the field of +0 (scale 0, mantissa 0): exactly what an explicit
        # zero-padded input gives, including 0 * inf = NaN against an infinite weight.
        sa, ma = _load_fields(xs_ptr, xm_ptr, x_off, x_mask)
        sb, mb = _load_fields(ws_ptr, wm_ptr, w_off, w_mask)
        acc += _tile_sum(sa, ma, sb, mb, IS_MBM, C0, C1)

    # Store straight into (B, O, Ho, Wo): along M the addresses are contiguous within an image, so the
    # tile store is coalesced along M, and no permute of a (G, B*Ho*Wo, N) result is needed afterwards.
    o_off = (b.to(tl.int64) * stride_ob + r)[:, None] + ((grp * N + offs_n.to(tl.int64)) * stride_oc)[None, :]
    tl.store(out_ptr + o_off, acc, mask=mask_m[:, None] & mask_n[None, :])


_conv2d_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "KH", "KW", "IS_MBM"],
                                prune_configs_by=_PRUNE)(_conv2d_kernel)


# --------------------------------------------------------------------------- host wrappers

def _check_tensors(op: str, **tensors: torch.Tensor) -> torch.device:
    """float32 tensors on one device, CUDA unless running under the Triton interpreter."""
    device = None
    for arg, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"triton.{op}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"triton.{op}: {arg} must be float32, got {t.dtype}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"triton.{op}: operands are on different devices ({device} and {t.device})")
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the triton backend needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                         "before importing it to run the kernels on the CPU (slow, for testing)")
    return device


def _kind_args(multiplier: Multiplier) -> dict:
    if multiplier.is_exact:
        raise ValueError("the 'exact' multiplier has no approximate kernel; mbmlib.functional runs torch's own ops "
                         "for it")
    c0, c1 = multiplier.corrections
    # enable_fp_fusion=False: no FMA contraction, so every product is rounded on its own exactly as in
    # the reference before it is summed (and Triton 3.9 does not warn about the unset default).
    return {"IS_MBM": multiplier.kind == "mbm", "C0": c0, "C1": c1, "enable_fp_fusion": False}


def _meta(config):
    """Launch meta-parameters of an explicit tile config (bypasses autotuning; used by tests)."""
    if isinstance(config, triton.Config):
        return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return dict(config)


def _on(device: torch.device):
    """Launch on the operands' GPU (triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _fields(x: torch.Tensor, multiplier: Multiplier):
    """(scale, mant) of x, once per tensor, with one shared set of strides (the kernels take one set).

    split_operand makes a contiguous copy of a strided x anyway; handing it the copy keeps the
    scale (which would otherwise follow x's strides) in the same layout as the mantissa.
    """
    scale, mant = split_operand(x.contiguous(), multiplier)
    if scale.stride() != mant.stride():
        scale, mant = scale.contiguous(), mant.contiguous()
    return scale, mant


def _grid_chunks(n_batch: int):
    for start in range(0, n_batch, _MAX_GRID_Y):
        yield start, min(_MAX_GRID_Y, n_batch - start)


def bmm_nt(a: torch.Tensor, b: torch.Tensor, multiplier: Multiplier, *, _config=None) -> torch.Tensor:
    """Batched approximate ``a @ b.T``: a (G, M, K), b (G, N, K) -> (G, M, N), float32 sums.

    Any strides.
    """
    device = _check_tensors("bmm_nt", a=a, b=b)
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"triton.bmm_nt expects a (G, M, K) and b (G, N, K), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    G, M, K = a.shape
    N = b.shape[1]
    out = torch.empty(G, M, N, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    sa, ma = _fields(a, multiplier)
    sb, mb = _fields(b, multiplier)
    kernel, meta = (_bmm_nt_tuned, {}) if _config is None else (_bmm_nt_kernel, _meta(_config))
    with _on(device):
        _launch_bmm(kernel, meta, sa, ma, sb, mb, out, multiplier)
    return out


def _launch_bmm(kernel, meta, sa, ma, sb, mb, out, multiplier):
    G, M, K = sa.shape
    N = sb.shape[1]
    for g0, ng in _grid_chunks(G):
        def grid(META):
            return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]), ng)
        kernel[grid](
            sa, ma, sb, mb, out, M, N, K, g0,
            *sa.stride(), *sb.stride(), *out.stride(),
            **_kind_args(multiplier), **meta,
        )


def conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
           multiplier: Multiplier, *, _config=None) -> torch.Tensor:
    """Approximate 2-D convolution as an implicit GEMM: x (B, C, H, W), w (O, C/groups, kh, kw).

    ``padding`` is explicit and symmetric (zeros).  Returns (B, O, Ho, Wo) float32, contiguous.
    No im2col is materialised: the kernel derives input coordinates from the GEMM indices.
    """
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)  # pairs, checked by functional
    device = _check_tensors("conv2d", x=x, w=w)
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"triton.conv2d expects x (B, C, H, W) and w (O, C/groups, kh, kw), got "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    B, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    if groups < 1 or C % groups or O % groups or Cg != C // groups:
        raise ValueError(f"triton.conv2d: {C} input channels, {O} output channels and weight {tuple(w.shape)} "
                         f"do not fit groups={groups}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"triton.conv2d: invalid stride {stride}, padding {padding} or dilation {dilation}")
    Ho, Wo = output_size((H, W), (KH, KW), stride, padding, dilation)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"triton.conv2d: kernel {KH}x{KW} (dilation {dilation}) is larger than the padded "
                         f"input {H + 2 * padding[0]}x{W + 2 * padding[1]}")
    out = torch.empty(B, O, Ho, Wo, dtype=torch.float32, device=device)
    M, N, K = B * Ho * Wo, O // groups, Cg * KH * KW
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    sx, mx = _fields(x, multiplier)  # (B, C, H, W), once for the whole input
    sw, mw = _fields(w, multiplier)  # (O, Cg, KH, KW)
    kernel, meta = (_conv2d_tuned, {}) if _config is None else (_conv2d_kernel, _meta(_config))
    with _on(device):
        for g0, ng in _grid_chunks(groups):
            def grid(META):
                return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]), ng)
            kernel[grid](
                sx, mx, sw, mw, out, M, N, K, g0,
                Cg, H, W, Ho, Wo,
                *sx.stride(), *sw.stride(), out.stride(0), out.stride(1),
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                KH=KH, KW=KW, **_kind_args(multiplier), **meta,
            )
    return out


def conv2d_grads(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
                 multiplier: Multiplier) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and weight gradients with approximate products (im2col / col2im around :func:`bmm_nt`)."""
    return conv2d_grads_via_gemm(grad, x, w, stride, padding, dilation, groups, multiplier, bmm_nt)
