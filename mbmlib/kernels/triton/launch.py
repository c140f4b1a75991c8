"""Host side of the Triton backend: operands encoded once per tensor, one launcher per shape, a guarded fallback.

An operand's encoding follows the multiplier: float words (:func:`words`, the N side biased) for float
designs, integer words (:func:`int_words`) for integer designs and tables; :func:`design_constexprs`
picks the kernels' MAC and accumulator.  The GEMM and the convolution each have one launcher for both.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from ...multipliers.designs import ONE, drum_reduced, lmul_constants
from ...multipliers.floating import check_float_tensors, split_operand
from ...multipliers.integer import int_fields
from ...multipliers.specs import Multiplier
from .. import fallback
from ..lowering import check_int_gemm, output_size
from .device import (ACC_IDS, MAC_IDS, _conv2d_grad_input_kernel, _conv2d_grad_weight_kernel, _conv2d_kernel,
                     _gemm_kernel)
from .tiles import CONV_TILES, INTERPRET, Tile, _cdiv, _tile_for

__all__ = ["name", "BIAS", "words", "int_words", "encode", "design_constexprs", "bmm_nt", "bmm_nt_int", "conv2d",
           "conv2d_int", "conv2d_grads", "recorded_launches"]

name = "triton"
_MAX_GRID_Z = 65535  # CUDA limit on grid axes 1 and 2; more groups / batches are launched in chunks
BIAS = 0x3F800000  # bits of 1.0f, added to the mantissas of the float words of the N-side operand


# --------------------------------------------------------------------------- operands

def words(x: torch.Tensor, multiplier: Multiplier, bias: int = 0) -> torch.Tensor:
    """int64 words of x's fields, same shape: scale bits low, (mantissa + bias) high; +0 is the word 0.

    L-Mul's mantissas are cut to their top n bits here, once per operand.
    """
    scale, mant = split_operand(x, multiplier)
    if multiplier.mac == "lmul":
        mant = mant & lmul_constants(multiplier.param)[0]
    low = scale.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((mant.to(torch.int64) + bias) << 32) | low


def int_words(q: torch.Tensor, multiplier: Multiplier, m_side: bool) -> torch.Tensor:
    """int64 words of sign-magnitude integers for the integer MACs (see device._int_mac).

    High half: the mantissa field (formula designs) or the table index (|q|, a signed table's
    q mod 2**n).  Low half: ``sign << 8`` plus, for formula designs, ``23 - k`` on the M side and
    ``k`` on the N side, so one subtraction gives the product's right shift.  The integer 0 of a
    formula design has sign 0 (and k = 0), a table's sign 1 (its row 0 counts); the padding word 0
    gives the product 0 (tables whose row 0 is not zero are padded with real operands upstream).
    DRUM's word is its signed reduced operand itself (``sign * A'``, :func:`drum_reduced`).
    """
    if multiplier.mac == "drum":
        return drum_reduced(q, multiplier.param)
    f1, f2 = int_fields(q, multiplier)  # (sign * (k + 1), mantissa) or (sign, magnitude)
    sign = torch.sign(f1)
    low = sign << 8
    if multiplier.kind != "table":
        k = (f1.abs() - 1).clamp(min=0)
        low = low | (23 - k if m_side else k)
    return (f2.to(torch.int64) << 32) | (low.to(torch.int64) & 0xFFFFFFFF)


def encode(x: torch.Tensor, multiplier: Multiplier, side: str) -> torch.Tensor:
    """The words the kernels read for operand ``x`` on ``side`` "m" (lanes) or "n" (broadcast), same shape."""
    if multiplier.is_integer:
        return int_words(x, multiplier, m_side=side == "m")
    return words(x, multiplier, BIAS if side == "n" else 0)


def _mac_name(multiplier: Multiplier) -> str:
    """The multiplier's specialised MAC ("mbm", "mitchell", "lmul", "drum", "table"); ValueError for a design
    without one."""
    if multiplier.is_exact:
        raise ValueError("the 'exact' multiplier has no approximate kernel; mbmlib.functional runs torch's own ops "
                         "for it")
    if multiplier.mac is None:
        raise ValueError(f"the Triton kernels have no multiply-accumulate for {multiplier.name!r}; run it through "
                         "mbmlib.functional (mbmlib.kernels.route picks its generic path)")
    return multiplier.mac


def design_constexprs(multiplier: Multiplier, k: int = 1) -> dict:
    """The kernels' design constexprs and compile options for sums of ``k`` products (also read by bench --sass).

    ``enable_fp_fusion=False``: no FMA contraction, so every float product is rounded on its own exactly as in
    the reference before it is summed.  ``RZ``: the cvt.rz instruction exists on CUDA, not in the interpreter.
    Integer sums are int32 where no sum of ``k`` products can overflow it, else int64 (always where ``WIDE``,
    see :func:`_wide`).
    ``C0``: MBM's correction without a carry, or L-Mul's ``2**-l`` (23-bit fixed point); ``C1``: MBM's with one.
    """
    mac = _mac_name(multiplier)
    integer = multiplier.is_integer
    if ("int" if integer else "float", mac) not in MAC_IDS:
        raise ValueError(f"the Triton kernels have no multiply-accumulate for {multiplier.name!r} yet; "
                         "mbmlib.kernels.route runs it on the reference backend")
    c0, c1 = (lmul_constants(multiplier.param)[1] - ONE, 0) if mac == "lmul" else multiplier.corrections
    wide = integer and _wide(multiplier)
    acc = "float32" if not integer else "int64" if wide or max(1, k) * multiplier.max_product >= 2**31 else "int32"
    return {"MAC": MAC_IDS["int" if integer else "float", mac], "C0": c0, "C1": c1, "RZ": not INTERPRET,
            "BITS": multiplier.bits or 0, "WIDE": wide, "ACC": ACC_IDS[acc], "enable_fp_fusion": False}


def _wide(multiplier: Multiplier) -> bool:
    """Whether an integer MAC forms its products in int64: log designs over 12 bits (k1 + k2 > 22: shifts go left
    too) and 16-bit DRUM (products reach 2**32); tables never (their entries pick the accumulator)."""
    if multiplier.mac == "drum":
        return multiplier.max_product >= 2**31
    return multiplier.mac != "table" and 2 * (multiplier.bits - 1) > 22


def _table_pointer(multiplier: Multiplier, device: torch.device, transposed: bool, placeholder: torch.Tensor):
    """A table multiplier's flat table (read transposed when the lanes run along N), else an unused pointer."""
    return _table(multiplier, device, transposed) if multiplier.kind == "table" else placeholder


@functools.lru_cache(maxsize=16)
def _table(multiplier: Multiplier, device: torch.device, transposed: bool) -> torch.Tensor:
    """A table multiplier's entries flattened (A-major, or B-major if ``transposed``): int32 where they fit.

    Cached, like :func:`mbmlib.multipliers.integer.flat_table`: a layer's every call reads the same table.
    """
    t = multiplier.table.t() if transposed else multiplier.table
    dtype = torch.int32 if multiplier.max_product < 2**31 else torch.int64
    return t.contiguous().reshape(-1).to(device=device, dtype=dtype)



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


def _int_device(op: str, *tensors: torch.Tensor) -> torch.device:
    """The one device of the integer operands, checked as :func:`_kernel_device` does."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"triton.{op}: the operands are on different devices ({', '.join(map(str, devices))})")
    return _kernel_device(devices.pop())


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



# --------------------------------------------------------------------------- fallback

_FALLBACK = "compiled"


def _gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (sm_{''.join(map(str, torch.cuda.get_device_capability(device)))})"
    return "the CPU (Triton interpreter)"


def _guarded(op: str, device: torch.device, launch, args: tuple, fallback_args: tuple):
    """Run ``launch(*args)``; if the Triton kernel fails to compile or launch, warn once and use ``compiled``."""
    stage = f"triton:{op}"
    if not fallback.failed(stage):
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                return launch(*args)
        except Exception as err:  # any compiler / driver error: the run must go on
            message = (f"mbmlib: the Triton kernel for {op} failed on {_gpu_name(device)} ({{reason}}); using the "
                       f"'{_FALLBACK}' backend instead from now on. To choose a backend yourself pass "
                       "backend='compiled' (or 'reference') or set the environment variable MBMLIB_BACKEND=compiled.")
            fallback.give_up(stage, err, message, stacklevel=3)
    from .. import load  # the kernels' loader; imported here, it imports this package

    return getattr(load(_FALLBACK), op)(*fallback_args)


# --------------------------------------------------------------------------- one launcher per shape

_RECORDING: list | None = None  # set by recorded_launches: the launches are recorded, not run


def _run(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``, or, inside :func:`recorded_launches`, only its record."""
    if _RECORDING is not None:
        _RECORDING.append((kernel, grid, args, meta))
    else:
        kernel[grid](*args, **meta)


@contextlib.contextmanager
def recorded_launches():
    """Within the block, the launchers record ``(kernel, grid, args, meta)`` in the list yielded instead of
    launching: ``bench --sass`` compiles each launch with the arguments a GPU would get, no GPU needed."""
    global _RECORDING
    saved, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = saved


def _result(out: torch.Tensor) -> torch.Tensor:
    """The launch's output as the backend returns it: float32 sums, or exact integer sums as float64."""
    return out if out.dtype == torch.float32 else out.to(torch.float64)


def _check_bmm(op: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"triton.{op} expects (G, M, K) and (G, N, K) operands, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def _gemm_launch(a, b, multiplier, out, tile):
    """Lanes run along the longer of M and N (the other operand is the broadcast one): a swap if N > M, and
    a table is then read transposed."""
    swap = b.shape[1] > a.shape[1]
    rows, cols = (b, a) if swap else (a, b)
    G, M, K = rows.shape
    N = cols.shape[1]
    tile = _tile_for(M, N, tile)
    wa = _pad_last(encode(rows, multiplier, "m").transpose(1, 2), tile.block_m)  # (G, K, Mp), K-major
    wb = _pad_last(encode(cols, multiplier, "n").transpose(1, 2), tile.block_n)  # (G, K, Np)
    table = _table_pointer(multiplier, out.device, swap, wa)
    stride_om, stride_on = out.stride()[1:] if not swap else out.stride()[:0:-1]
    for g0, ng in _z_chunks(G):
        _run(_gemm_kernel, (_cdiv(M, tile.block_m), _cdiv(N, tile.block_n), ng),
             wa, wb, out, table, M, N, K, g0, wa.stride(0), wa.stride(1), wb.stride(0), wb.stride(1),
            out.stride(0), stride_om, stride_on, **design_constexprs(multiplier, K), **tile.meta())
    return _result(out)


def _conv2d_launch(x, w, stride, padding, dilation, groups, multiplier, out, tile):
    B, O, Ho, Wo = out.shape
    Cg, KH, KW = w.shape[1:]
    M, N = B * Ho * Wo, O // groups
    tile = _tile_for(M, N, tile, CONV_TILES)
    wx = encode(x.contiguous(), multiplier, "m")  # (B, C, H, W)
    ww = _kmajor_weights(encode(w.contiguous(), multiplier, "n"), groups, tile.block_n, channels_out=True)
    table = _table_pointer(multiplier, out.device, False, wx)
    for g0, ng in _z_chunks(groups):
        _run(_conv2d_kernel, (_cdiv(M, tile.block_m), _cdiv(N, tile.block_n), ng),
             wx, ww, out, table, M, N, Cg, x.shape[2], x.shape[3], Ho, Wo, g0,
            *wx.stride(), ww.stride(0), ww.stride(3), out.stride(0), out.stride(1),
            *_conv_args(stride, padding, dilation), KH=KH, KW=KW, **design_constexprs(multiplier, Cg * KH * KW),
            **tile.meta())
    return _result(out)


# --------------------------------------------------------------------------- the backend's functions

def bmm_nt(a: torch.Tensor, b: torch.Tensor, multiplier: Multiplier, *, _tile: Tile | None = None) -> torch.Tensor:
    """Batched approximate ``a @ b.T``: a (G, M, K), b (G, N, K) -> (G, M, N), float32 sums.  Any strides."""
    device = _check_tensors("bmm_nt", a=a, b=b)
    _check_bmm("bmm_nt", a, b)
    design_constexprs(multiplier)  # a multiplier the kernels cannot run is refused here, not in the fallback
    out = torch.empty(a.shape[0], a.shape[1], b.shape[1], dtype=torch.float32, device=device)
    if out.numel() == 0 or a.shape[2] == 0:
        return out.zero_()
    return _guarded("bmm_nt", device, _gemm_launch, (a, b, multiplier, out, _tile), (a, b, multiplier))


def bmm_nt_int(qa: torch.Tensor, qb: torch.Tensor, multiplier: Multiplier, *, ranged: bool = False,
               _tile: Tile | None = None) -> torch.Tensor:
    """Integer ``qa @ qb.T`` of sign-magnitude integers: (G, M, K), (G, N, K) -> (G, M, N) float64, exact sums.

    ``ranged``: the magnitudes are known to fit (quantised), so they are not scanned (no synchronisation).
    """
    check_int_gemm(qa, qb, multiplier, ranged=ranged)
    _check_bmm("bmm_nt_int", qa, qb)
    device = _int_device("bmm_nt_int", qa, qb)
    out = torch.zeros(qa.shape[0], qa.shape[1], qb.shape[1], dtype=torch.int64, device=device)
    if out.numel() == 0 or qa.shape[2] == 0:
        return out.to(torch.float64)
    return _guarded("bmm_nt_int", device, _gemm_launch, (qa, qb, multiplier, out, _tile), (qa, qb, multiplier))


def conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
           multiplier: Multiplier, *, _tile: Tile | None = None) -> torch.Tensor:
    """Approximate 2-D convolution as an implicit GEMM: x (B, C, H, W), w (O, C/groups, kh, kw) -> (B, O, Ho, Wo).

    ``padding`` is explicit and symmetric (zeros).  No im2col is materialised: the kernel derives
    input coordinates from the GEMM indices and masks the padding.
    """
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)  # pairs, checked by functional
    device = _check_tensors("conv2d", x=x, w=w)
    (B, C, H, W), (O, Cg, KH, KW), (Ho, Wo) = _check_conv("conv2d", x, w, stride, padding, dilation, groups)
    design_constexprs(multiplier)
    out = torch.empty(B, O, Ho, Wo, dtype=torch.float32, device=device)
    if out.numel() == 0 or Cg * KH * KW == 0:
        return out.zero_()
    args = (x, w, stride, padding, dilation, groups, multiplier)
    return _guarded("conv2d", device, _conv2d_launch, args + (out, _tile), args)


def conv2d_int(qx: torch.Tensor, qw: torch.Tensor, stride, padding, dilation, groups: int,
               multiplier: Multiplier, *, ranged: bool = False, _tile: Tile | None = None) -> torch.Tensor:
    """Integer convolution as an implicit GEMM: (B, C, H, W), (O, C/groups, kh, kw) -> (B, O, Ho, Wo) float64."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    check_int_gemm(qx, qw, multiplier, k=qw[0].numel(), ranged=ranged)
    device = _int_device("conv2d_int", qx, qw)
    (B, C, H, W), (O, Cg, KH, KW), (Ho, Wo) = _check_conv("conv2d_int", qx, qw, stride, padding, dilation, groups)
    out = torch.zeros(B, O, Ho, Wo, dtype=torch.int64, device=device)
    if out.numel() == 0 or Cg * KH * KW == 0:
        return out.to(torch.float64)
    args = (qx, qw, stride, padding, dilation, groups, multiplier)
    return _guarded("conv2d_int", device, _conv2d_launch, args + (out, _tile), args)


# --------------------------------------------------------------------------- convolution helpers

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


# --------------------------------------------------------------------------- convolution gradients (float designs)

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
    kind = design_constexprs(multiplier)
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


def _has_nonfinite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a NaN or infinity; a meta tensor has no values (a launch recorded from shapes alone,
    :mod:`mbmlib.workflow.sass`, specialises as for finite weights)."""
    return not t.is_meta and not bool(torch.isfinite(t).all())


def _grad_input_launch(wg, w, stride, padding, dilation, groups, multiplier, kind, grad_x, tile):
    B, C, H, W = grad_x.shape
    O, Cg, KH, KW = w.shape
    M, N = B * H * W, Cg
    tile = _tile_for(M, N, tile, CONV_TILES)
    ww = _kmajor_weights(words(w, multiplier, BIAS), groups, tile.block_n, channels_out=False)  # (G, KH, KW, Og, Np)
    for g0, ng in _z_chunks(groups):
        _run(_conv2d_grad_input_kernel, (_cdiv(M, tile.block_m), _cdiv(N, tile.block_n), ng),
             wg, ww, grad_x, wg, M, N, O // groups, H, W, wg.shape[2], wg.shape[3], g0,
            *wg.stride(), ww.stride(0), ww.stride(3), grad_x.stride(0), grad_x.stride(1),
            *_conv_args(stride, padding, dilation), KH=KH, KW=KW,
            NONFINITE_W=_has_nonfinite(w), **kind, **tile.meta())


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
    _run(_conv2d_grad_weight_kernel, (*grid_mn, splits * groups),
         gl, xp, part, gl, M, N, KH * KW, Ho, Wo, b_per, B, groups,
        gl.stride(0), gl.stride(2), gl.stride(3), *xp.stride(), part.stride(0), part.stride(1),
        *stride, *dilation, KW=KW, **kind, **tile.meta())
    return part.sum(0).view(w_shape)  # (G, Og, Cg*KH*KW) -> (O, Cg, KH, KW)
