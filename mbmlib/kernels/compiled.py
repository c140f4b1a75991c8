"""Compiled backend: a register-blocked C++ GEMM on the CPU, ``torch.compile`` kernels as its fallback.

On the CPU the approximate GEMM runs in :mod:`.cpu_native` (a C++ kernel with
AVX-512/AVX2 intrinsics, built on first use with the system compiler).  Where
it cannot be built, and on CUDA without Triton, the inductor kernel below is used;
where that cannot be compiled either, the slow reference with one warning.

For the inductor kernel, the whole integer expression of the approximate product is written as one
broadcast ``(G, M, N, K)`` expression reduced over K.  Inductor fuses it into
the reduction loop -- nothing of size M*N*K is ever stored -- provided it is
allowed to keep a long pointwise chain unrealised: ``realize_opcount_threshold``
is raised for these kernels only.  Shapes are marked dynamic, so one kernel per
multiplier serves every layer and batch size.
"""
from __future__ import annotations

import functools

import torch

from ..multipliers.designs import MANT_BITS, drum_reduced
from ..multipliers.floating import significand, split_operand
from ..multipliers.integer import flat_table, int_fields, int_products
from ..multipliers.specs import Multiplier
from . import cpu_native, cpu_native_int, fallback, reference
from .lowering import check_exact_sums, check_int_gemm, conv2d_grads_via_gemm, conv2d_int_via_gemm, conv2d_via_gemm

name = "compiled"

_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 1000}  # fuse the ~15-op product into the K loop
# Each multiplier, and each size-0/1 specialisation of G, M, N, K, is a cache entry of the same code:
# more than dynamo's default limit of 8 in a normal session.
_DYNAMO_LIMITS = {"recompile_limit": 64, "accumulated_recompile_limit": 1024}


def _fused_bmm_nt(sa, ma, sb, mb, multiplier: Multiplier):
    """sum_k product(a[g, m, k], b[g, n, k]) from split operands; written for inductor to fuse."""
    g = significand(ma[:, :, None, :], mb[:, None, :, :], multiplier).to(torch.float32)  # (G, M, N, K): K innermost
    return ((sa[:, :, None, :] * sb[:, None, :, :]) * (g * 2.0**-MANT_BITS)).sum(-1)


@functools.lru_cache(maxsize=None)
def _kernel(multiplier: Multiplier):
    """The fused reduction, compiled once per multiplier with every shape dynamic."""
    fn = functools.partial(_fused_bmm_nt, multiplier=multiplier)
    return torch.compile(fn, dynamic=True, fullgraph=True, options=_INDUCTOR_OPTIONS)


# Inductor's loop nest has no cache blocking: for every row of A it streams all of B.  B is therefore
# handed over in column blocks of at most this many bytes (both fields), which stay in the L2 cache.
_B_BLOCK_BYTES = 512 * 1024


def _blocked_over_n(kernel, sa, ma, sb, mb):
    """Run ``kernel`` on blocks of B's rows (output columns) small enough to stay in cache."""
    G, N, K = sb.shape
    n_step = max(16, _B_BLOCK_BYTES // (8 * max(1, K)))
    if N <= n_step:
        return kernel(sa, ma, sb, mb)
    out = torch.empty(G, sa.shape[1], N, dtype=torch.float32, device=sa.device)
    for n0 in range(0, N, n_step):
        out[:, :, n0:n0 + n_step] = kernel(sa, ma, sb[:, n0:n0 + n_step], mb[:, n0:n0 + n_step])
    return out


_INDUCTOR_FAILED = ("mbmlib: torch.compile is unavailable here, so the approximate kernels fall back to the slow "
                    "'reference' backend ({reason}). Install a C++ compiler (CPU) or Triton (CUDA) to get the fast "
                    "path.")


def _warn_fallback(err: Exception) -> None:
    fallback.give_up("inductor", err, _INDUCTOR_FAILED, stacklevel=3)


def _native_available(device: torch.device) -> bool:
    """Whether the C++ kernel serves ``device`` (CPU only); a failed build is recorded (silently: inductor is
    as fast), not retried."""
    if device.type != "cpu" or fallback.failed("native"):
        return False
    try:
        cpu_native.library()
        return True
    except cpu_native.BuildError as err:
        fallback.give_up("native", err, None)
        return False


def bmm_nt_split(sa: torch.Tensor, ma: torch.Tensor, sb: torch.Tensor, mb: torch.Tensor,
                 multiplier: Multiplier) -> torch.Tensor:
    """Approximate ``a @ b.T`` from split operands (see :func:`split_operand`): (G, M, K), (G, N, K)."""
    if _native_available(sa.device):
        return cpu_native.bmm_nt_split(sa, ma, sb, mb, multiplier)
    if fallback.failed("inductor"):
        return reference.bmm_nt_split(sa, ma, sb, mb, multiplier)
    try:
        with torch._dynamo.config.patch(_DYNAMO_LIMITS):
            return _blocked_over_n(_kernel(multiplier), sa, ma, sb, mb)
    except Exception as err:  # compilation failed: no compiler, unsupported platform, ...
        _warn_fallback(err)
        return reference.bmm_nt_split(sa, ma, sb, mb, multiplier)


def bmm_nt(a: torch.Tensor, b: torch.Tensor, multiplier: Multiplier) -> torch.Tensor:
    """Batched approximate ``a @ b.T``: a (G, M, K), b (G, N, K) -> (G, M, N), float32 sums.

    On the C++ kernel ``b`` (a layer's weight) is split and packed once per version of it."""
    if _native_available(a.device):
        return cpu_native.bmm_nt(a, b, multiplier)
    return bmm_nt_split(*split_operand(a, multiplier), *split_operand(b, multiplier), multiplier)


def conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
           multiplier: Multiplier) -> torch.Tensor:
    """Approximate convolution: the C++ implicit GEMM on the CPU, else im2col + :func:`bmm_nt_split`."""
    if _native_available(x.device):
        return cpu_native.conv2d(x, w, stride, padding, dilation, groups, multiplier)
    return conv2d_via_gemm(x, w, stride, padding, dilation, groups, multiplier, bmm_nt_split)


def conv2d_grads(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
                 multiplier: Multiplier) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and weight gradients with approximate products (im2col / col2im around :func:`bmm_nt`)."""
    return conv2d_grads_via_gemm(grad, x, w, stride, padding, dilation, groups, multiplier, bmm_nt)


# ----------------------------------------------------------------------------- integer multipliers (SPEC section 4)


@functools.lru_cache(maxsize=None)
def _int_kernel(multiplier: Multiplier):
    """The fused integer reduction, compiled once per multiplier with every shape dynamic.

    A closure, not a ``functools.partial``: torch.compile wraps every partial in one shared code
    object, whose recompile limit would then be spent by these kernels for everyone else's.
    """

    def fused_bmm_nt_int(a1, a2, b1, b2, table):
        """sum_k sign * P(|a[g, m, k]|, |b[g, n, k]|) from integer fields, int64, fused by inductor."""
        p = int_products(a1[:, :, None, :], a2[:, :, None, :], b1[:, None, :, :], b2[:, None, :, :], multiplier,
                         table)  # (G, M, N, K), never stored: inductor reduces it in its K loop
        return p.sum(-1)

    return torch.compile(fused_bmm_nt_int, dynamic=True, fullgraph=True, options=_INDUCTOR_OPTIONS)


def bmm_nt_int(qa: torch.Tensor, qb: torch.Tensor, multiplier: Multiplier, *, ranged: bool = False) -> torch.Tensor:
    """Integer ``qa @ qb.T`` (G, M, K), (G, N, K) -> (G, M, N) float64 exact sums.

    The C++ integer GEMM on the CPU for the designs it covers (:func:`cpu_native_int.supports_int`), else
    fused by inductor (DRUM: :func:`_drum_bmm_nt`); the reference (one warning) where torch.compile does not
    work either.  ``ranged``: the magnitudes are known to fit (quantised), so they are not scanned.
    """
    check_int_gemm(qa, qb, multiplier, ranged=ranged)
    if cpu_native_int.supports_int(multiplier) and _native_available(qa.device):
        return cpu_native_int.bmm_nt_int(qa, qb, multiplier)
    if multiplier.mac == "drum":
        return _drum_bmm_nt(qa, qb, multiplier)
    if fallback.failed("inductor"):
        return reference.bmm_nt_int(qa, qb, multiplier, ranged=True)
    table = flat_table(multiplier, qa.device) if multiplier.kind == "table" else None
    fields = (*int_fields(qa, multiplier), *int_fields(qb, multiplier))
    try:
        with torch._dynamo.config.patch(_DYNAMO_LIMITS):
            return _int_kernel(multiplier)(*fields, table).to(torch.float64)
    except Exception as err:  # compilation failed: no compiler, unsupported platform, ...
        _warn_fallback(err)
        return reference.bmm_nt_int(qa, qb, multiplier, ranged=True)


def _drum_bmm_nt(qa: torch.Tensor, qb: torch.Tensor, multiplier: Multiplier) -> torch.Tensor:
    """DRUM without the C++ kernel: the float64 GEMM of its reduced operands, exact (integer products below
    2**32, every partial sum below 2**53: check_int_gemm), on any device; inductor cannot compile its frexp."""
    k = multiplier.param
    return torch.bmm(drum_reduced(qa, k).double(), drum_reduced(qb, k).double().transpose(1, 2))


def conv2d_int(qx: torch.Tensor, qw: torch.Tensor, stride, padding, dilation, groups: int,
               multiplier: Multiplier, *, ranged: bool = False) -> torch.Tensor:
    """Integer convolution (B, C, H, W), (O, C/groups, kh, kw) -> (B, O, Ho, Wo) float64: the C++ implicit GEMM
    where it covers the multiplier, else im2col + :func:`bmm_nt_int`."""
    check_int_gemm(qx, qw, multiplier, k=qw[0].numel(), ranged=ranged)
    if cpu_native_int.supports_int(multiplier) and _native_available(qx.device):
        return cpu_native_int.conv2d_int(qx, qw, stride, padding, dilation, groups, multiplier)
    gemm = functools.partial(bmm_nt_int, ranged=True)  # checked once, above
    return conv2d_int_via_gemm(qx, qw, stride, padding, dilation, groups, multiplier, gemm)


# ----------------------------------------------------------------------------- quantised layers, fused on the CPU


def fuses_quantisation(multiplier: Multiplier, device: torch.device) -> bool:
    """Whether :func:`conv2d_quant` / :func:`bmm_nt_quant` serve ``multiplier`` on ``device``: the C++ kernel,
    which quantises the activations in its operand pass and scales the sums as it stores them."""
    return cpu_native_int.supports_int(multiplier) and _native_available(device)


def bmm_nt_quant(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 multiplier: Multiplier) -> tuple[torch.Tensor, int, cpu_native_int.QuantisedB]:
    """Quantised ``a @ b.T`` of float32 ``a`` and ``b`` (quantised here): :func:`cpu_native_int.bmm_nt_quant`."""
    check_exact_sums(a.shape[-1], multiplier)
    return cpu_native_int.bmm_nt_quant(a, a_scale, b, b_scale, multiplier)


def conv2d_quant(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, stride, padding,
                 dilation, groups: int, multiplier: Multiplier) -> tuple[torch.Tensor, int, cpu_native_int.QuantisedB]:
    """Quantised convolution of float32 ``x`` and ``w`` (quantised here): :func:`cpu_native_int.conv2d_quant`."""
    check_exact_sums(w[0].numel(), multiplier)
    return cpu_native_int.conv2d_quant(x, x_scale, w, w_scale, tuple(stride), tuple(padding), tuple(dilation), groups,
                                       multiplier)
