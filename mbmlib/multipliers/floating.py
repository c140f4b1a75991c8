"""Bit-exact float32 approximate products (SPEC section 1) on the bit patterns, with integer tensor ops.

The products are computed in the *value domain* so that the same decomposition
also serves the GEMM kernels: every operand is split once into

* ``scale`` -- the float ``sign * 2**k`` (0 for zero/subnormal, +-inf, NaN), and
* ``mant``  -- its 23-bit mantissa field, truncated for ``t > 0``,

and each product is ``scale_a * scale_b * G(mant_a + mant_b) * 2**-23`` where
``G`` is an integer of at most 24 significant bits.  Powers of two times a
24-bit significand are exact in float32, so this reproduces the bit-level
rules exactly; results below the smallest normal are flushed to zero.
"""
from __future__ import annotations

import functools

import torch

from .designs import MANT_BITS, MANT_MASK, normalise_significand, on_registry_change
from .specs import Multiplier

__all__ = [
    "SMALLEST_NORMAL",
    "MANTISSA_TABLE_MAX_BITS",
    "split_operand",
    "check_float_tensor",
    "check_float_tensors",
    "significand",
    "products",
    "approx_mul_float",
]

SIGN_EXP_MASK = -(1 << MANT_BITS)  # int32 0xFF800000
SMALLEST_NORMAL = 2.0**-126
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def split_operand(x: torch.Tensor, multiplier: Multiplier) -> tuple[torch.Tensor, torch.Tensor]:
    """Split float32 ``x`` into ``(scale, mant)``: float ``sign*2**k`` and int32 mantissa field.

    Subnormals and zeros get scale +-0, infinities +-inf, NaN stays NaN.  The
    mantissa is truncated per ``multiplier.t``.  Done once per tensor, so GEMM
    kernels do not repeat it per product.
    """
    x = x.contiguous()  # both fields contiguous whatever x's strides: the kernels read them along K
    bits = x.view(torch.int32)
    scale = (bits & SIGN_EXP_MASK).view(torch.float32)  # mantissa cleared; subnormal -> +-0
    scale = torch.where(torch.isnan(x), x, scale)
    mant = bits & MANT_MASK
    t = multiplier.t
    if t > 0:
        mant = (mant & -(1 << t)) | (1 << t)  # keep the top 23-t bits, force the lowest to 1
    return scale, mant


MANTISSA_TABLE_MAX_BITS = 8  # a generic float design keeping this many mantissa bits or fewer is looked up


def significand(ma: torch.Tensor, mb: torch.Tensor, multiplier: Multiplier) -> torch.Tensor:
    """Significand ``G`` (< 2**25, at most 24 significant bits) of products of mantissa fields (broadcasting).

    The product is ``scale_a*scale_b*G*2**-23``.  The design gives ``G``; the frame
    normalises it (truncating).  A design without a specialised kernel whose
    mantissas keep 8 bits or fewer is read from its table of significands, as
    ApproxTrain simulates float designs; the table is made from the same function.
    """
    design = multiplier.design
    if design is None:
        raise ValueError(f"the {multiplier.name!r} multiplier has no mantissa approximation")
    if design.mac is None and MANT_BITS - multiplier.t <= MANTISSA_TABLE_MAX_BITS:
        table, shift, width = _mantissa_table(multiplier, ma.device)
        return table[((ma >> shift) << width) + (mb >> shift)]
    return normalise_significand(design.reference(ma, mb, multiplier))


@functools.lru_cache(maxsize=16)
def _mantissa_table(multiplier: Multiplier, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """(flat table of normalised G over the truncated fields, the fields' shift, index width) of a float design.

    A truncated field is ``(hi << (t + 1)) | (1 << t)``: ``hi`` (22 - t bits) is its index.
    """
    shift = multiplier.t + 1
    width = MANT_BITS - shift
    fields = (torch.arange(1 << width, dtype=torch.int64) << shift) | (1 << multiplier.t)
    g = normalise_significand(multiplier.design.reference(fields[:, None], fields[None, :], multiplier))
    return g.reshape(-1).to(device=device, dtype=torch.int32), shift, width


on_registry_change(_mantissa_table.cache_clear)


def products(sa: torch.Tensor, ma: torch.Tensor, sb: torch.Tensor, mb: torch.Tensor, multiplier: Multiplier,
             flush: bool = True) -> torch.Tensor:
    """Approximate products of split operands (broadcasting), float32.

    ``flush`` zeroes results below 2**-126, as the circuit does.  The GEMM kernels
    pass ``flush=False``: a flushed term changes a sum by less than 2**-126.
    """
    g = significand(ma, mb, multiplier).to(torch.float32)
    r = (sa * sb) * (g * 2.0**-MANT_BITS)
    if not flush:
        return r
    return torch.where(r.abs() < SMALLEST_NORMAL, torch.zeros((), dtype=r.dtype, device=r.device), r)


def check_float_tensor(x, name: str, what: str) -> None:
    """TypeError unless ``x`` is a float16/bfloat16/float32/float64 tensor (``what`` needs it)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} needs floating-point tensors (float16/bfloat16/float32/float64); "
                        f"{name} has dtype {x.dtype}")


def check_float_tensors(named: dict, what: str) -> torch.device:
    """Float tensors (None entries skipped) of one dtype on one device, with PyTorch's error types; their device.

    The one tensor check of the layers (:mod:`mbmlib.functional`) and of the kernels that take tensors directly.
    """
    present = [(name, t) for name, t in named.items() if t is not None]
    first_name, first = present[0]
    for name, t in present:
        check_float_tensor(t, name, what)
        if t.dtype != first.dtype:
            raise RuntimeError(f"{first_name} type ({first.dtype}) and {name} type ({t.dtype}) should be the same")
        if t.device != first.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found {first_name} on "
                               f"{first.device} and {name} on {t.device}; move them with .to(device)")
    return first.device


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_float_operands(a, b) -> torch.dtype:
    """Float tensors; a float64 one within float32's range (the designs are float32: 1e300 would become inf)."""
    for name, x in (("a", a), ("b", b)):
        check_float_tensor(x, name, "approximate multiplication")
        if x.dtype == torch.float64 and x.numel() and bool((x.abs() > _FLOAT32_MAX).logical_and(x.isfinite()).any()):
            raise ValueError(f"{name} holds float64 values beyond float32's range (|x| > {_FLOAT32_MAX:.4g}); the "
                             "approximate designs multiply float32 operands: scale the operands into that range")
    return torch.promote_types(a.dtype, b.dtype)


_CHUNK = 1 << 18  # elements per block: keeps the ~15 temporaries in cache


def _approx_mul_forward(a: torch.Tensor, b: torch.Tensor, mult: Multiplier) -> torch.Tensor:
    """The approximate products of float tensors on one device, in chunks; promoted dtype."""
    a32, b32 = torch.broadcast_tensors(a.to(torch.float32), b.to(torch.float32))
    a32, b32 = a32.reshape(-1), b32.reshape(-1)
    out = torch.empty(a32.shape, dtype=torch.float32, device=a32.device)
    for start in range(0, out.numel(), _CHUNK):
        sl = slice(start, start + _CHUNK)
        sa, ma = split_operand(a32[sl], mult)
        sb, mb = split_operand(b32[sl], mult)
        out[sl] = products(sa, ma, sb, mb, mult)
    return out.view(torch.broadcast_shapes(a.shape, b.shape)).to(torch.result_type(a, b))  # as torch.mul


class _StraightThrough(torch.autograd.Function):
    """Approximate product forward, the exact product's gradient backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, a, b, mult):
        ctx.save_for_backward(a, b)
        return _approx_mul_forward(a, b, mult)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = (grad * b).sum_to_size(a.shape).to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_b = (grad * a).sum_to_size(b.shape).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


def approx_mul_float(a: torch.Tensor, b: torch.Tensor, mult: Multiplier) -> torch.Tensor:
    """Elementwise approximate products of float tensors (see :func:`mbmlib.approx_mul`)."""
    _check_float_operands(a, b)
    if a.device != b.device:
        if a.dim() > 0 and b.dim() > 0:
            torch.mul(a, b)  # raise torch's own device-mismatch error
        # torch.mul lets a 0-dim CPU tensor meet a tensor on another device: do the same
        a, b = (a.to(b.device), b) if a.dim() == 0 else (a, b.to(a.device))
    if mult.is_exact:
        return torch.mul(a, b)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _StraightThrough.apply(a, b, mult)
    return _approx_mul_forward(a, b, mult)
