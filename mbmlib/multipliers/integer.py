"""Integer multipliers on sign-magnitude integer tensors (SPEC section 4): MBM/Mitchell of any width, tables.

For n-bit magnitudes the formula designs use the float significand rules:
``float(A)`` is ``2**k * (1 + x)`` with ``x`` exact in k <= 15 fraction bits, so the
float product of ``float(A)`` and ``float(B)`` (section 1) is ``2**(k1+k2) * G``
exactly, and ``P = floor`` of it.  Every operand is split once into two fields
(the same split as the float kernels use), which the GEMM kernels then combine
pair by pair with :func:`int_products`:

* formula multipliers: ``(scale, mant)`` = ``(sign * 2**k, 23-bit mantissa field)``;
* table multipliers: ``(sign, magnitude)``, the product a gather from the table.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .floating import products, split_operand
from .specs import Multiplier

__all__ = ["check_int_tensor", "int_fields", "int_products", "flat_table", "approx_mul_int", "EXACT_SUM_LIMIT"]

EXACT_SUM_LIMIT = 2**53  # float64 holds every integer sum below this exactly
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_int_tensor(x, name: str, multiplier: Multiplier) -> None:
    """TypeError unless ``x`` is an integer tensor; ValueError if a magnitude exceeds the multiplier's."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INT_DTYPES:
        raise TypeError(f"the integer multiplier {multiplier.name!r} needs integer tensors (sign-magnitude values); "
                        f"{name} has dtype {x.dtype}: quantise it first (mbmlib.quant) or use a float multiplier")
    if x.numel() and x.abs().max().item() > multiplier.max_magnitude:
        raise ValueError(f"{name} has magnitude {x.abs().max().item()}, above {multiplier.max_magnitude}, the "
                         f"largest the {multiplier.bits}-bit multiplier {multiplier.name!r} takes; clamp it first")


@functools.lru_cache(maxsize=16)
def _flat_table(multiplier: Multiplier, device: torch.device) -> torch.Tensor:
    """The table, flattened A-major, as float64 on ``device`` (gathered per product)."""
    return multiplier.table.reshape(-1).to(device=device, dtype=torch.float64)


def int_fields(q: torch.Tensor, multiplier: Multiplier) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sign-magnitude integers into the two fields :func:`int_products` combines (same shape as ``q``)."""
    if multiplier.kind == "table":
        return torch.sign(q).to(torch.float32), q.abs().to(torch.int64)
    return split_operand(q.to(torch.float32), multiplier)  # exact: |q| < 2**16


def flat_table(multiplier: Multiplier, device: torch.device) -> torch.Tensor:
    """A table multiplier's entries, flattened A-major, float64 on ``device`` (cached)."""
    return _flat_table(multiplier, torch.device(device))


def int_products(a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor,
                 multiplier: Multiplier, table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sign * P(|a|, |b|)`` from split fields (broadcasting), float64 holding exact integers.

    ``table``: the :func:`flat_table` of a table multiplier, if the caller holds it already.
    """
    if multiplier.kind == "table":
        table = flat_table(multiplier, a2.device) if table is None else table
        return (a1 * b1).to(torch.float64) * table[(a2 << multiplier.bits) + b2]
    # the float product 2**(k1+k2) * G is exact in float32 (24-bit significand); its floor is P
    return torch.trunc(products(a1, a2, b1, b2, multiplier, flush=False)).to(torch.float64)


def approx_mul_int(a: torch.Tensor, b: torch.Tensor, multiplier: Multiplier) -> torch.Tensor:
    """Elementwise ``sign(a*b) * P(|a|, |b|)`` of integer tensors (broadcasting), int64."""
    check_int_tensor(a, "a", multiplier)
    check_int_tensor(b, "b", multiplier)
    if a.device != b.device:
        a, b = (a.to(b.device), b) if a.dim() == 0 else (a, b.to(a.device))
    a, b = torch.broadcast_tensors(a, b)
    return int_products(*int_fields(a, multiplier), *int_fields(b, multiplier), multiplier).to(torch.int64)

