"""Integer multipliers on sign-magnitude integer tensors (SPEC section 4): MBM/Mitchell of any width, tables.

For n-bit magnitudes the formula designs use the float significand rules:
``float(A)`` is ``2**k * (1 + x)`` with ``x`` exact in k <= 15 fraction bits, so its
23-bit mantissa field is exact and ``P = (G << (k1 + k2)) >> 23`` with ``G`` the
significand of section 1 (:func:`~.floating.significand`).  Every operand is split once
into two int32 fields, which the GEMM kernels then combine pair by pair with
:func:`int_products` (int64, so sums are exact):

* the built-in log designs: ``(sign * (k + 1), 23-bit mantissa field)``, 0 for a zero operand;
* unsigned tables and every other design: ``(sign, magnitude)`` with the sign of 0 positive,
  the product a gather from the table or the design's own function of the magnitudes;
* signed tables: ``(1, q mod 2**n)``, the two's-complement index, the product a plain gather.

A design without a specialised kernel (a user's) runs on the table kernels through
:func:`generated_table`, its table of products made from the same function.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .designs import MAC_IDS, MANT_BITS, on_registry_change
from .floating import significand, split_operand
from .specs import Multiplier, MultiplierLike, as_multiplier
from .table import MAX_TABLE_BITS, write_table_csv

__all__ = ["check_int_tensor", "int_fields", "int_products", "flat_table", "approx_mul_int", "EXACT_SUM_LIMIT",
           "table_from_multiplier", "generated_table", "write_csv"]

EXACT_SUM_LIMIT = 2**53  # float64 holds every integer sum below this exactly
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_int_tensor(x, name: str, multiplier: Multiplier, ranged: bool = False) -> None:
    """TypeError unless ``x`` is an integer tensor; ValueError if a magnitude exceeds the multiplier's.

    ``ranged``: the caller guarantees the magnitudes (quantisation clamps them), so they are not scanned:
    no device synchronisation in a quantised layer's forward.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INT_DTYPES:
        raise TypeError(f"the integer multiplier {multiplier.name!r} needs integer tensors (sign-magnitude values); "
                        f"{name} has dtype {x.dtype}: quantise it first (mbmlib.quant) or use a float multiplier")
    if ranged or not x.numel():
        return
    lo, hi = multiplier.q_range
    least, most = (v.item() for v in torch.aminmax(x.to(torch.int64)))
    if least < lo or most > hi:
        kind = "signed (two's-complement)" if multiplier.signed else "sign-magnitude"
        raise ValueError(f"{name} holds {least if least < lo else most}, outside {lo}..{hi}, the {kind} range of the "
                         f"{multiplier.bits}-bit multiplier {multiplier.name!r}; clamp it first")


@functools.lru_cache(maxsize=16)
def _flat_table(multiplier: Multiplier, device: torch.device) -> torch.Tensor:
    return multiplier.table.reshape(-1).to(device)


def flat_table(multiplier: Multiplier, device: torch.device) -> torch.Tensor:
    """A table multiplier's entries, flattened A-major, int64 on ``device`` (cached)."""
    return _flat_table(multiplier, torch.device(device))


def int_fields(q: torch.Tensor, multiplier: Multiplier) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sign-magnitude integers into the two int32 fields :func:`int_products` combines (shape of ``q``)."""
    q = q.to(torch.int32)  # int8 -128 has no int8 magnitude
    if multiplier.signed:
        return torch.ones_like(q), q & ((1 << multiplier.bits) - 1)
    if multiplier.kind == "table":
        return 1 - 2 * (q < 0).to(torch.int32), q.abs()  # the operand 0 is positive: T[0, B] counts
    sign = torch.sign(q)
    if multiplier.mac not in MAC_IDS:  # designs without a log-domain kernel
        return sign, q.abs()
    qf = q.to(torch.float32)  # exact: |q| < 2**16
    _, mant = split_operand(qf, multiplier)
    return sign * torch.frexp(qf).exponent, mant  # frexp's exponent of |q| >= 1 is k + 1


@functools.lru_cache(maxsize=None)
def _float_twin(kind: str) -> Multiplier:
    """The float multiplier whose significand a built-in integer log design uses (SPEC section 4)."""
    return Multiplier(kind)


def int_products(a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor,
                 multiplier: Multiplier, table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sign * P(|a|, |b|)`` from split fields (broadcasting), int64.

    ``table``: the :func:`flat_table` of a table multiplier, if the caller holds it already.
    """
    if multiplier.kind == "table":
        table = flat_table(multiplier, a2.device) if table is None else table
        return (a1 * b1).to(torch.int64) * table[(a2 << multiplier.bits) + b2]
    if multiplier.mac not in MAC_IDS:  # a design's own function of the magnitudes
        return (a1 * b1).to(torch.int64) * multiplier.design.reference(a2.to(torch.int64), b2.to(torch.int64),
                                                                       multiplier)
    g = significand(a2, b2, _float_twin(multiplier.kind)).to(torch.int64)  # 2**23 * significand, < 2**25
    shift = (a1.abs() + b1.abs() - 2).to(torch.int64)  # k1 + k2 (-1, -2: a zero operand, masked by the sign)
    return torch.sign(a1 * b1).to(torch.int64) * ((g << shift.clamp(min=0)) >> MANT_BITS)


def approx_mul_int(a: torch.Tensor, b: torch.Tensor, multiplier: Multiplier) -> torch.Tensor:
    """Elementwise ``sign(a*b) * P(|a|, |b|)`` of integer tensors (broadcasting), int64; a signed table's
    ``T[a mod 2**n, b mod 2**n]``."""
    check_int_tensor(a, "a", multiplier)
    check_int_tensor(b, "b", multiplier)
    if a.device != b.device:
        a, b = (a.to(b.device), b) if a.dim() == 0 else (a, b.to(a.device))
    a, b = torch.broadcast_tensors(a, b)
    return int_products(*int_fields(a, multiplier), *int_fields(b, multiplier), multiplier)


def table_from_multiplier(multiplier: MultiplierLike) -> torch.Tensor:
    """The (2**n, 2**n) int64 table ``P(A, B)`` of an integer multiplier (n <= 12)."""
    mult = as_multiplier(multiplier)
    if not mult.is_integer or mult.bits > MAX_TABLE_BITS:
        raise ValueError(f"tables are built from integer multipliers of at most {MAX_TABLE_BITS} bits such as "
                         f"'mbm-int8', got {mult.name!r}")
    if mult.kind == "table":
        return mult.table.clone()
    a = torch.arange(1 << mult.bits)
    return approx_mul_int(a[:, None], a[None, :], mult)  # (2**n, 2**n)


@functools.lru_cache(maxsize=16)
def generated_table(multiplier: Multiplier) -> Multiplier:
    """The table multiplier of an integer design (n <= 12): the same products, on the table kernels."""
    return Multiplier.from_table(table_from_multiplier(multiplier))


on_registry_change(generated_table.cache_clear)


def write_csv(multiplier: MultiplierLike, path, column: str = "MBM") -> None:
    """Write an integer multiplier's table as CSV ``A,B,<column>``, A-major (the format ``Multiplier.from_csv`` reads)."""
    mult = as_multiplier(multiplier)
    write_table_csv(table_from_multiplier(mult), path, column, signed=mult.signed)
