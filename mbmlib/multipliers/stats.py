"""Relative-error statistics and maps of a multiplier (SPEC section 1's table; section 4 for integer designs).

Float multipliers are measured over operand mantissas, integer and table
multipliers over their non-zero magnitudes (every pair for n <= 8, sampled
above), always against the exact product.
"""
from __future__ import annotations

import torch

from .designs import MANT_BITS, ONE
from .elementwise import approx_mul
from .integer import approx_mul_int
from .specs import Multiplier, MultiplierLike, as_multiplier

__all__ = ["error_stats", "error_map"]


def _operands_from_fields(fields: torch.Tensor) -> torch.Tensor:
    """Floats in [1, 2) with the given 23-bit mantissa fields."""
    return (fields | 0x3F800000).view(torch.float32)


def _relative_error_pct(a: torch.Tensor, b: torch.Tensor, mult: Multiplier) -> torch.Tensor:
    """(approx - exact) / exact in percent, exact in float64."""
    exact = a.double() * b.double()
    return (approx_mul(a, b, mult).double() - exact) / exact * 100.0


_EDGE_BITS = 10  # lattice of 2**10 mantissas per operand with the low 13 bits zero


_ALL_PAIRS_BITS = 8  # integer multipliers up to this width are measured over every pair of magnitudes


def _int_relative_error_pct(a: torch.Tensor, b: torch.Tensor, mult: Multiplier) -> torch.Tensor:
    """(P(A, B) - A*B) / (A*B) in percent for non-zero magnitudes (broadcasting)."""
    exact = (a * b).double()
    return (approx_mul_int(a, b, mult).double() - exact) / exact * 100.0


def _int_error_stats(mult: Multiplier, n: int, seed: int) -> dict:
    """Integer multipliers: every pair of magnitudes 1..2**n-1 for n <= 8, else ``n`` random pairs plus a lattice."""
    top = mult.max_magnitude
    if mult.bits <= _ALL_PAIRS_BITS:
        mags = torch.arange(1, top + 1)
        rel = _int_relative_error_pct(mags[:, None], mags[None, :], mult).flatten()
        extremes, count = rel, rel.numel()
    else:
        gen = torch.Generator().manual_seed(seed)
        a, b = (torch.randint(1, top + 1, (n,), generator=gen) for _ in "ab")
        rel, count = _int_relative_error_pct(a, b, mult), n
        lattice = torch.arange(1, 1 << _ALL_PAIRS_BITS) << (mult.bits - _ALL_PAIRS_BITS)  # powers of two among them
        extremes = torch.cat([rel, _int_relative_error_pct(lattice[:, None], lattice[None, :], mult).flatten()])
    return {"multiplier": mult.name, "n": count, "bias": rel.mean().item(), "mean_abs": rel.abs().mean().item(),
            "max": extremes.max().item(), "min": extremes.min().item()}


def error_stats(multiplier: MultiplierLike, n: int = 1_000_000, seed: int = 0) -> dict:
    """Relative-error statistics (percent) of ``multiplier`` over operands in [1, 2).

    ``bias`` (mean) and ``mean_abs`` come from ``n`` pairs with uniformly random
    23-bit mantissas.  ``max`` and ``min`` are taken over those pairs *and* the
    1024 x 1024 lattice of mantissas whose low 13 bits are zero: the error
    peaks sit at powers of two (x = 0), which random sampling almost never hits.
    Exponents do not change the relative error.

    Integer and table multipliers: over every pair of non-zero magnitudes when
    ``bits <= 8`` (``n`` is then that count), else over ``n`` uniform random
    pairs, with the extremes also over a 255 x 255 lattice holding the powers of two.
    """
    mult = as_multiplier(multiplier)
    if n < 1:
        raise ValueError(f"n must be a positive number of samples, got {n}")
    if mult.is_integer:
        return _int_error_stats(mult, n, seed)
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
    operands ``1 + x[i]`` and ``1 + x[j]`` -- ready for a heat map.  Integer and
    table multipliers: ``x`` are magnitudes spread evenly over 1..2**n-1 (all of
    them when ``bins >= 2**n - 1``) and ``err[i, j]`` is for the pair ``x[i], x[j]``.
    """
    mult = as_multiplier(multiplier)
    if not 2 <= bins <= 4096:
        raise ValueError(f"bins must be between 2 and 4096, got {bins}")
    if mult.is_integer:
        mags = torch.linspace(1, mult.max_magnitude, min(bins, mult.max_magnitude), dtype=torch.float64)
        mags = mags.round().long().unique()
        return mags.double(), _int_relative_error_pct(mags[:, None], mags[None, :], mult)
    step = ONE // bins
    fields = torch.arange(bins, dtype=torch.int32) * step + step // 2  # cell centres
    ops = _operands_from_fields(fields)
    return fields.double() / ONE, _relative_error_pct(ops[:, None], ops[None, :], mult)
