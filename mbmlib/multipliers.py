"""Multiplier specs and the bit-exact elementwise approximate products.

A multiplier is named by a string ("exact", "mitchell", "mbm", "mbm-t16",
"mitchell-t8", ...) or a :class:`Multiplier`.  The elementwise ops work on the
float32 bit patterns with integer tensor ops and follow ``SPEC.md`` section 1
bit for bit.

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

import dataclasses
import re
from typing import Union

import torch

__all__ = [
    "Multiplier",
    "MultiplierLike",
    "as_multiplier",
    "MULTIPLIER_KINDS",
    "split_operand",
    "check_float_tensor",
    "mantissa_product",
    "approx_mul",
    "mbm_mul",
    "mitchell_mul",
    "error_stats",
    "error_map",
]

MULTIPLIER_KINDS = ("exact", "mitchell", "mbm")
MAX_TRUNCATION = 22
MANT_BITS = 23
MANT_MASK = (1 << MANT_BITS) - 1
SIGN_EXP_MASK = -(1 << MANT_BITS)  # int32 0xFF800000
ONE = 1 << MANT_BITS  # 1.0 in 23-bit fixed point
MBM_CORRECTION = 0xA0000  # 2**-4 + 2**-6 = 0.078125 in 23-bit fixed point
SMALLEST_NORMAL = 2.0**-126
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_EXACT_TAKES_NO_T = "the 'exact' multiplier takes no truncation; valid names are 'exact', 'mbm[-t<N>]', 'mitchell[-t<N>]'"
_NAME_RE = re.compile(r"^(exact|mitchell|mbm)(?:-t(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Multiplier:
    """An approximate float32 multiplier: ``kind`` and mantissa truncation ``t``.

    ``kind`` is one of "exact", "mitchell", "mbm"; ``t`` (0..22) keeps the top
    ``23 - t`` mantissa bits (t = 0 is the full design).
    """

    kind: str = "mbm"
    t: int = 0

    def __post_init__(self):
        if self.kind not in MULTIPLIER_KINDS:
            raise ValueError(
                f"unknown multiplier kind {self.kind!r}; valid kinds are "
                f"{', '.join(MULTIPLIER_KINDS)} (optionally with '-t<N>', 0 <= N <= {MAX_TRUNCATION})"
            )
        if not isinstance(self.t, int) or not 0 <= self.t <= MAX_TRUNCATION:
            raise ValueError(f"valid truncations are integers t = 0..{MAX_TRUNCATION}, got {self.t!r}")
        if self.kind == "exact" and self.t != 0:
            raise ValueError(_EXACT_TAKES_NO_T)

    @property
    def name(self) -> str:
        """Canonical string name, e.g. ``"mbm-t16"``; parses back to the same spec."""
        return self.kind if self.t == 0 else f"{self.kind}-t{self.t}"

    @property
    def is_exact(self) -> bool:
        return self.kind == "exact"

    @property
    def corrections(self) -> tuple[int, int]:
        """MBM correction for (no carry, carry), masked below bit t; (0, 0) for Mitchell."""
        if self.kind != "mbm":
            return (0, 0)
        keep = -(1 << self.t) if self.t > 16 else -1  # -(2**t) == ~(2**t - 1)
        return (MBM_CORRECTION & keep, (MBM_CORRECTION >> 1) & keep)

    def __str__(self) -> str:
        return self.name


MultiplierLike = Union[str, Multiplier]


def as_multiplier(spec: MultiplierLike) -> Multiplier:
    """Parse a multiplier name ("mbm", "mitchell-t8", "exact") or pass a Multiplier through."""
    if isinstance(spec, Multiplier):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"multiplier must be a str or mbmlib.Multiplier, got {type(spec).__name__}")
    match = _NAME_RE.match(spec.strip().lower())
    if match is None:
        raise ValueError(
            f"unknown multiplier {spec!r}; valid names are 'exact', 'mitchell', 'mbm', "
            f"or 'mitchell-t<N>' / 'mbm-t<N>' with 0 <= N <= {MAX_TRUNCATION}"
        )
    kind, t = match.group(1), int(match.group(2) or 0)
    if kind == "exact" and match.group(2) is not None:
        raise ValueError(_EXACT_TAKES_NO_T)
    return Multiplier(kind, t)


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


def _product_from_parts(sa, ma, sb, mb, multiplier: Multiplier) -> torch.Tensor:
    """Approximate products from split operands (broadcasting), flushed below 2**-126."""
    g = mantissa_product(ma + mb, multiplier).to(torch.float32) * (2.0**-MANT_BITS)
    r = (sa * sb) * g
    return torch.where(r.abs() < SMALLEST_NORMAL, torch.zeros((), dtype=r.dtype, device=r.device), r)


def check_float_tensor(x, name: str, what: str) -> None:
    """TypeError unless ``x`` is a float16/bfloat16/float32/float64 tensor (``what`` needs it)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} needs floating-point tensors (float16/bfloat16/float32/float64); "
                        f"{name} has dtype {x.dtype}")


def _check_float_operands(a, b) -> torch.dtype:
    for name, x in (("a", a), ("b", b)):
        check_float_tensor(x, name, "approximate multiplication")
    return torch.promote_types(a.dtype, b.dtype)


_CHUNK = 1 << 18  # elements per block: keeps the ~15 temporaries in cache


def approx_mul(a: torch.Tensor, b: torch.Tensor, multiplier: MultiplierLike = "mbm") -> torch.Tensor:
    """Elementwise approximate product, broadcasting like ``torch.mul``.

    Computed in float32 bit patterns and returned in the promoted input dtype.
    Integer or complex inputs raise ``TypeError``; tensors on different devices
    raise what ``torch.mul`` raises.
    """
    mult = as_multiplier(multiplier)
    out_dtype = _check_float_operands(a, b)
    if a.device != b.device:
        if a.dim() > 0 and b.dim() > 0:
            torch.mul(a, b)  # raise torch's own device-mismatch error
        # torch.mul lets a 0-dim CPU tensor meet a tensor on another device: do the same
        a, b = (a.to(b.device), b) if a.dim() == 0 else (a, b.to(a.device))
    if mult.is_exact:
        return torch.mul(a.float(), b.float()).to(out_dtype)
    a32, b32 = torch.broadcast_tensors(a.to(torch.float32), b.to(torch.float32))
    a32, b32 = a32.reshape(-1), b32.reshape(-1)
    out = torch.empty(a32.shape, dtype=torch.float32, device=a32.device)
    for start in range(0, out.numel(), _CHUNK):
        sl = slice(start, start + _CHUNK)
        sa, ma = split_operand(a32[sl], mult)
        sb, mb = split_operand(b32[sl], mult)
        out[sl] = _product_from_parts(sa, ma, sb, mb, mult)
    return out.view(torch.broadcast_shapes(a.shape, b.shape)).to(out_dtype)


def mbm_mul(a: torch.Tensor, b: torch.Tensor, t: int = 0) -> torch.Tensor:
    """Minimally Biased Multiplier product (Saadat et al. 2018), mantissa truncation ``t``."""
    return approx_mul(a, b, Multiplier("mbm", t))


def mitchell_mul(a: torch.Tensor, b: torch.Tensor, t: int = 0) -> torch.Tensor:
    """Mitchell's logarithmic multiplier product, mantissa truncation ``t``."""
    return approx_mul(a, b, Multiplier("mitchell", t))


def _operands_from_fields(fields: torch.Tensor) -> torch.Tensor:
    """Floats in [1, 2) with the given 23-bit mantissa fields."""
    return (fields | 0x3F800000).view(torch.float32)


def _relative_error_pct(a: torch.Tensor, b: torch.Tensor, mult: Multiplier) -> torch.Tensor:
    """(approx - exact) / exact in percent, exact in float64."""
    exact = a.double() * b.double()
    return (approx_mul(a, b, mult).double() - exact) / exact * 100.0


_EDGE_BITS = 10  # lattice of 2**10 mantissas per operand with the low 13 bits zero


def error_stats(multiplier: MultiplierLike, n: int = 1_000_000, seed: int = 0) -> dict:
    """Relative-error statistics (percent) of ``multiplier`` over operands in [1, 2).

    ``bias`` (mean) and ``mean_abs`` come from ``n`` pairs with uniformly random
    23-bit mantissas.  ``max`` and ``min`` are taken over those pairs *and* the
    1024 x 1024 lattice of mantissas whose low 13 bits are zero: the error
    peaks sit at powers of two (x = 0), which random sampling almost never hits.
    Exponents do not change the relative error.
    """
    mult = as_multiplier(multiplier)
    if n < 1:
        raise ValueError(f"n must be a positive number of samples, got {n}")
    gen = torch.Generator().manual_seed(seed)
    a, b = (_operands_from_fields(torch.randint(0, ONE, (n,), generator=gen, dtype=torch.int32)) for _ in "ab")
    rel = _relative_error_pct(a, b, mult)
    edges = _operands_from_fields(torch.arange(1 << _EDGE_BITS, dtype=torch.int32) << (MANT_BITS - _EDGE_BITS))
    rel_edges = _relative_error_pct(edges[:, None], edges[None, :], mult)
    return {
        "multiplier": mult.name,
        "n": n,
        "bias": rel.mean().item(),
        "mean_abs": rel.abs().mean().item(),
        "max": max(rel.max().item(), rel_edges.max().item()),
        "min": min(rel.min().item(), rel_edges.min().item()),
    }


def error_map(multiplier: MultiplierLike, bins: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative error (%) over a ``bins x bins`` grid of mantissas ``x1, x2`` in [0, 1).

    Returns ``(x, err)``: the grid coordinates (bins,) and ``err[i, j]`` for
    operands ``1 + x[i]`` and ``1 + x[j]`` -- ready for a heat map.
    """
    mult = as_multiplier(multiplier)
    if not 2 <= bins <= 4096:
        raise ValueError(f"bins must be between 2 and 4096, got {bins}")
    step = ONE // bins
    fields = torch.arange(bins, dtype=torch.int32) * step + step // 2  # cell centres
    ops = _operands_from_fields(fields)
    return fields.double() / ONE, _relative_error_pct(ops[:, None], ops[None, :], mult)

