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

import torch

from .specs import MANT_BITS, MANT_MASK, ONE, Multiplier, MultiplierLike, as_multiplier

__all__ = [
    "SMALLEST_NORMAL",
    "split_operand",
    "check_float_tensor",
    "check_float_tensors",
    "mantissa_product",
    "products",
    "approx_mul",
    "mbm_mul",
    "mitchell_mul",
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


def mantissa_product(mant_sum: torch.Tensor, multiplier: Multiplier) -> torch.Tensor:
    """Significand ``G`` (int32, < 2**25, at most 24 significant bits) of a product.

    ``mant_sum = mant_a + mant_b``; the product is ``scale_a*scale_b*G*2**-23``.
    Mitchell: ``1 + x1 + x2``, or ``2 * (x1 + x2)`` after a carry.  MBM adds
    the correction (halved after a carry), truncates when normalising, and
    skips the correction in the carry/overflow corner case.
    """
    if multiplier.is_exact:
        raise ValueError("the exact multiplier has no mantissa approximation; multiply the floats directly")
    s = mant_sum
    carry = s >= ONE
    if multiplier.kind == "mitchell":
        return torch.where(carry, s << 1, s + ONE)
    c0, c1 = multiplier.corrections
    m0 = s + (ONE + c0)  # no carry: 1 + x1 + x2 + c, maybe >= 2
    g0 = m0 & ~(m0 >> 24)  # >= 2: drop the bit the normalising shift truncates
    t1 = s + c1  # carry: 2 * (x1 + x2 + c/2)
    g1 = torch.where(t1 < 2 * ONE, t1, s) << 1  # corner case: skip the correction
    return torch.where(carry, g1, g0)


def products(sa: torch.Tensor, ma: torch.Tensor, sb: torch.Tensor, mb: torch.Tensor, multiplier: Multiplier,
             flush: bool = True) -> torch.Tensor:
    """Approximate products of split operands (broadcasting), float32.

    ``flush`` zeroes results below 2**-126, as the circuit does.  The GEMM kernels
    pass ``flush=False``: a flushed term changes a sum by less than 2**-126.
    """
    g = mantissa_product(ma + mb, multiplier).to(torch.float32)
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


def _check_float_operands(a, b) -> torch.dtype:
    for name, x in (("a", a), ("b", b)):
        check_float_tensor(x, name, "approximate multiplication")
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


def approx_mul(a: torch.Tensor, b: torch.Tensor, multiplier: MultiplierLike = "mbm") -> torch.Tensor:
    """Elementwise approximate product, broadcasting like ``torch.mul``.

    Float multipliers: computed in float32 bit patterns and returned in the
    promoted input dtype; gradients are straight-through, those of ``a * b``
    (``grad_a = grad * b``, ``grad_b = grad * a``).  ``"exact"`` is ``torch.mul``.
    Integer multipliers ("mbm-int8", tables) take integer tensors of
    sign-magnitude values and return ``sign(a*b) * P(|a|, |b|)`` as int64.
    Integer inputs to a float multiplier, or float inputs to an integer one,
    raise ``TypeError``; tensors on different devices raise what ``torch.mul`` raises.
    """
    mult = as_multiplier(multiplier)
    if mult.is_integer:
        from .integer import approx_mul_int
        return approx_mul_int(a, b, mult)
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


def mbm_mul(a: torch.Tensor, b: torch.Tensor, t: int = 0) -> torch.Tensor:
    """Minimally Biased Multiplier product (Saadat et al. 2018), mantissa truncation ``t``."""
    return approx_mul(a, b, Multiplier("mbm", t))


def mitchell_mul(a: torch.Tensor, b: torch.Tensor, t: int = 0) -> torch.Tensor:
    """Mitchell's logarithmic multiplier product, mantissa truncation ``t``."""
    return approx_mul(a, b, Multiplier("mitchell", t))
